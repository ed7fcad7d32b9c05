"""Surface distances against full-volume scipy references and MONAI's Hausdorff / surface distance."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from segcalib.metrics import surface_distances, surface_distances_per_class
from segcalib.metrics.surface import linear_percentile
from tests.metrics._reference import blobs, ref_surface

SPACING_3D = (1.0, 0.8, 2.5)


def pair(shape, seed: int, num_classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = blobs(shape, num_classes, rng, coarse=4)
    noisy = np.where(rng.random(shape) < 0.02, rng.integers(0, num_classes, shape), gt)
    pred = np.roll(noisy, 1, axis=0)
    return pred, gt


def assert_close(got: dict, ref: dict, rtol: float = 1e-12) -> None:
    for key in ("hd", "hd95", "assd"):
        np.testing.assert_allclose(got[key], ref[key], rtol=rtol, equal_nan=True, err_msg=key)


@pytest.mark.parametrize("shape, spacing", [((40, 36), (0.7, 1.3)), ((18, 20, 14), SPACING_3D)])
@pytest.mark.parametrize("pooled", [False, True])
def test_matches_scipy_reference(shape, spacing, pooled: bool) -> None:
    pred, gt = pair(shape, seed=0)
    for k in (1, 2):
        got = surface_distances(torch.from_numpy(pred == k), torch.from_numpy(gt == k), spacing, pooled=pooled)
        assert_close(got, ref_surface(pred == k, gt == k, spacing, pooled=pooled))
    got = surface_distances(torch.from_numpy(pred == 1), torch.from_numpy(gt == 1), spacing, percentile=80)
    assert_close(got, ref_surface(pred == 1, gt == 1, spacing, q=80))


def test_matches_monai_including_masks_on_the_image_border() -> None:
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    pred, gt = pair((22, 18, 16), seed=1, num_classes=4)  # blobs touch every image face
    onehot = lambda x: torch.nn.functional.one_hot(torch.from_numpy(x)[None], 4).movedim(-1, 1)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(onehot(pred), onehot(gt), include_background=True, spacing=list(SPACING_3D))
        hd95 = compute_hausdorff_distance(
            onehot(pred), onehot(gt), include_background=True, percentile=95, spacing=list(SPACING_3D)
        )
        assd = compute_average_surface_distance(
            onehot(pred), onehot(gt), include_background=True, symmetric=True, spacing=list(SPACING_3D)
        )
    for k in range(4):
        got = surface_distances(torch.from_numpy(pred == k), torch.from_numpy(gt == k), SPACING_3D)
        # MONAI returns float32 values
        assert got["hd"] == pytest.approx(float(hd[0, k]), rel=1e-6)
        assert got["hd95"] == pytest.approx(float(hd95[0, k]), rel=1e-6)
        assert got["assd"] == pytest.approx(float(assd[0, k]), rel=1e-6)


def test_empty_masks() -> None:
    empty = torch.zeros(6, 7, 5, dtype=torch.bool)
    some = empty.clone()
    some[2:4, 3, 1:3] = True
    assert all(math.isnan(v) for v in surface_distances(empty, empty).values())
    assert all(math.isinf(v) for v in surface_distances(some, empty).values())
    assert all(math.isinf(v) for v in surface_distances(empty, some, SPACING_3D).values())
    assert surface_distances(some, some, SPACING_3D) == {"hd": 0.0, "hd95": 0.0, "assd": 0.0}


def test_single_voxels_and_known_distance() -> None:
    a = torch.zeros(10, 10, 10, dtype=torch.bool)
    b = a.clone()
    a[1, 1, 1] = True
    b[1, 4, 3] = True
    got = surface_distances(a, b, SPACING_3D)
    d = math.hypot(3 * 0.8, 2 * 2.5)
    assert got == pytest.approx({"hd": d, "hd95": d, "assd": d}, rel=1e-12)


def test_per_class_helper_and_numpy_inputs() -> None:
    pred, gt = pair((16, 15, 12), seed=2)
    per_class = surface_distances_per_class(torch.from_numpy(pred), torch.from_numpy(gt), 3, SPACING_3D, include_background=False)
    assert len(per_class) == 2
    for k, got in zip((1, 2), per_class):
        assert_close(got, ref_surface(pred == k, gt == k, SPACING_3D))
    assert_close(surface_distances(pred == 1, gt == 1, SPACING_3D), per_class[0])
    with pytest.raises(ValueError):
        surface_distances(pred == 1, gt[:-1] == 1)


def test_linear_percentile_matches_numpy() -> None:
    values = torch.from_numpy(np.random.default_rng(4).random(1001))
    for q in (0.0, 12.5, 50.0, 95.0, 99.9, 100.0):
        assert float(linear_percentile(values, q)) == pytest.approx(np.percentile(values.numpy(), q), rel=1e-14)
    assert float(linear_percentile(torch.tensor([3.0], dtype=torch.float64), 95)) == 3.0
    with pytest.raises(ValueError):
        linear_percentile(values, 101)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu() -> None:
    pred, gt = pair((40, 36, 30), seed=5)
    for k in (1, 2):
        cpu = surface_distances(torch.from_numpy(pred == k), torch.from_numpy(gt == k), SPACING_3D)
        gpu = surface_distances(torch.from_numpy(pred == k).cuda(), torch.from_numpy(gt == k).cuda(), SPACING_3D)
        assert_close(gpu, cpu)
