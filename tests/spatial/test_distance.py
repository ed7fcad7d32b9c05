"""Distance transforms (scipy, exact torch fallback, CuPy on CUDA) and nearest-voxel distances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from segcalib.metrics import distance_transform, nearest_distances
from segcalib.spatial.distance import _cupy, edt_torch


@pytest.mark.parametrize(
    "shape, spacing, density",
    [((37, 29), (0.7, 1.3), 0.95), ((13, 17, 11), (1.0, 0.8, 2.5), 0.9), ((20, 9, 15), (2.0, 0.5, 1.0), 0.995)],
)
def test_distance_transform_matches_scipy(shape, spacing, density) -> None:
    mask = np.random.default_rng(0).random(shape) < density
    expected = ndimage.distance_transform_edt(mask, sampling=spacing)
    got = distance_transform(torch.from_numpy(mask), spacing)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-13, atol=0)
    np.testing.assert_allclose(edt_torch(torch.from_numpy(mask), spacing).numpy(), expected, rtol=1e-13, atol=0)


def test_torch_edt_with_lines_and_planes_without_features() -> None:
    mask = np.ones((9, 10, 11), dtype=bool)
    mask[4, 2, 7] = False  # a single feature voxel: most lines have none
    spacing = (1.0, 0.8, 2.5)
    expected = ndimage.distance_transform_edt(mask, sampling=spacing)
    np.testing.assert_allclose(edt_torch(torch.from_numpy(mask), spacing).numpy(), expected, rtol=1e-13)


def test_no_background_gives_inf() -> None:
    mask = torch.ones(4, 5, dtype=torch.bool)
    assert torch.isinf(distance_transform(mask, None)).all()
    assert torch.isinf(edt_torch(mask, (1.0, 1.0))).all()


def test_nearest_distances_brute_force() -> None:
    rng = np.random.default_rng(1)
    spacing = (1.0, 0.8, 2.5)
    points = rng.random((12, 10, 8)) < 0.05
    targets = rng.random((12, 10, 8)) < 0.03
    points[0, 0, 0] = targets[0, 0, 0] = True  # a shared voxel: distance 0
    got = nearest_distances(torch.from_numpy(points), torch.from_numpy(targets), spacing).numpy()
    p = np.argwhere(points) * spacing
    t = np.argwhere(targets) * spacing
    expected = np.sqrt(((p[:, None, :] - t[None, :, :]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got[0] == 0.0
    empty = nearest_distances(torch.zeros(3, 3, dtype=torch.bool), torch.ones(3, 3, dtype=torch.bool))
    assert empty.numel() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_distance_transform_matches_scipy() -> None:
    mask = np.random.default_rng(2).random((40, 35, 30)) < 0.97
    spacing = (1.0, 0.8, 2.5)
    expected = ndimage.distance_transform_edt(mask, sampling=spacing)
    got = distance_transform(torch.from_numpy(mask).cuda(), spacing)
    assert got.is_cuda
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=1e-12)
    fallback = edt_torch(torch.from_numpy(mask).cuda(), spacing)
    np.testing.assert_allclose(fallback.cpu().numpy(), expected, rtol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available() or _cupy() is None, reason="needs CUDA and CuPy")
def test_cupy_backend_is_used_and_exact() -> None:
    from segcalib.spatial.distance import _edt_cupy

    mask = np.random.default_rng(3).random((33, 31, 29)) < 0.98
    expected = ndimage.distance_transform_edt(mask, sampling=(0.5, 1.0, 2.0))
    got = _edt_cupy(torch.from_numpy(mask).cuda(), (0.5, 1.0, 2.0))
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=1e-12)
