"""The GPU way of the surface measures -- crop to both masks' surfaces, dense EDT over the crop only,
read at the other mask's surface voxels -- run on CPU tensors (scipy's EDT on the crop) against
full-volume references: scipy EDTs on the whole image, and medpy on the same masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from medpy.metric import binary as medpy

from segcalib.metrics import surface_distances
from segcalib.metrics.medpy_compat import medpy_assd, medpy_hd, medpy_hd95
from segcalib.metrics.nsd import normalized_surface_dice
from segcalib.spatial import distance
from tests.metrics._reference import blobs, ref_surface


@pytest.fixture
def edt_shapes(monkeypatch) -> list[tuple[int, ...]]:
    """Route surface distances through the dense-EDT path on CPU; returns the shapes it was given."""
    shapes: list[tuple[int, ...]] = []
    real_edt = distance.edt

    def spy(mask, sp):
        shapes.append(tuple(mask.shape))
        return real_edt(mask, sp)

    monkeypatch.setattr(distance, "nearest_method", lambda device: "edt")
    monkeypatch.setattr(distance, "edt", spy)
    return shapes


def small_structures(shape, seed: int, spacing_steps: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping blobs far from the image border, the prediction shifted and noisier."""
    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, bool)
    inner = tuple(slice(s // 4, s // 4 + max(s // 3, 4)) for s in shape)
    gt[inner] = blobs(gt[inner].shape, 2, rng, coarse=3) == 1
    pred = np.roll(gt, spacing_steps, axis=0) | (rng.random(shape) < 0.002)  # a few far outliers too
    return pred, gt


@pytest.mark.parametrize("shape, spacing", [((48, 40), (0.7, 1.3)), ((30, 26, 22), (1.0, 0.8, 2.5))])
@pytest.mark.parametrize("pooled", [False, True])
def test_edt_on_the_crop_equals_full_volume_scipy(edt_shapes, shape, spacing, pooled) -> None:
    pred, gt = small_structures(shape, seed=len(shape))
    got = surface_distances(torch.from_numpy(pred), torch.from_numpy(gt), spacing, pooled=pooled)
    ref = ref_surface(pred, gt, spacing, pooled=pooled)
    for key in ("hd", "hd95", "assd"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12), key
    assert len(edt_shapes) == 2  # one EDT per direction


def test_crop_is_smaller_than_the_image_and_exact_for_a_distant_pair(edt_shapes) -> None:
    # two single voxels far apart in a large image: the crop spans both (plus one voxel), no more
    a = torch.zeros(60, 50, 40, dtype=torch.bool)
    b = a.clone()
    a[10, 12, 5] = True
    b[31, 40, 9] = True
    spacing = (0.5, 1.25, 3.0)
    got = surface_distances(a, b, spacing)
    d = math.sqrt((21 * 0.5) ** 2 + (28 * 1.25) ** 2 + (4 * 3.0) ** 2)
    assert got == pytest.approx({"hd": d, "hd95": d, "assd": d}, rel=1e-12)
    assert edt_shapes == [(22 + 2, 29 + 2, 5 + 2)] * 2  # the pair's extent plus one voxel each side


def test_masks_on_the_image_border(edt_shapes) -> None:
    # blobs touching every face: a border voxel is a surface voxel; the crop must not change that
    rng = np.random.default_rng(3)
    gt = blobs((20, 18, 16), 3, rng, coarse=4)
    pred = np.roll(gt, 2, axis=1)
    for k in range(3):
        got = surface_distances(torch.from_numpy(pred == k), torch.from_numpy(gt == k), (1.0, 0.8, 2.5))
        ref = ref_surface(pred == k, gt == k, (1.0, 0.8, 2.5))
        for key in ("hd", "hd95", "assd"):
            assert got[key] == pytest.approx(ref[key], rel=1e-12), (k, key)


def test_empty_masks_never_reach_the_edt(edt_shapes) -> None:
    empty = torch.zeros(8, 9, 7, dtype=torch.bool)
    some = empty.clone()
    some[2:5, 3, 1:4] = True
    assert all(math.isnan(v) for v in surface_distances(empty, empty).values())
    assert all(math.isinf(v) for v in surface_distances(some, empty, (1.0, 0.8, 2.5)).values())
    assert all(math.isinf(v) for v in surface_distances(empty, some).values())
    assert surface_distances(some, some, (1.0, 0.8, 2.5)) == {"hd": 0.0, "hd95": 0.0, "assd": 0.0}
    assert edt_shapes == [(5, 3, 5)] * 2  # only the identical pair, on its crop


def test_medpy_measures_and_nsd_through_the_edt_path(edt_shapes) -> None:
    pred, gt = small_structures((28, 24, 20), seed=7)
    spacing = (1.0, 0.8, 2.5)
    a, b = torch.from_numpy(pred), torch.from_numpy(gt)
    assert medpy_hd(a, b, spacing) == pytest.approx(medpy.hd(pred, gt, voxelspacing=spacing), rel=1e-12)
    assert medpy_hd95(a, b, spacing) == pytest.approx(medpy.hd95(pred, gt, voxelspacing=spacing), rel=1e-12)
    assert medpy_assd(a, b, spacing) == pytest.approx(medpy.assd(pred, gt, voxelspacing=spacing), rel=1e-12)
    with_edt = normalized_surface_dice(a, b, 1.5, spacing)
    edt_shapes.clear()
    distance.nearest_method = lambda device: "kdtree"  # restored by monkeypatch
    assert normalized_surface_dice(a, b, 1.5, spacing) == with_edt
    assert not edt_shapes


def test_default_method_per_device() -> None:
    assert distance.nearest_method(torch.device("cpu")) == "kdtree"
    assert distance.nearest_method(torch.device("cuda")) == "edt"
