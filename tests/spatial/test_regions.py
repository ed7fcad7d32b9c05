"""Region registry, edge voxels and the boundary band against scipy (binary_erosion, EDT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from segcalib.reports.calibration_json import calibration_json
from segcalib.metrics import RegionContext, available_regions, boundary_band, register_region
from segcalib.spatial.morphology import dilate_ellipsoid, ellipsoid_rows, label_edges, mask_edges
from segcalib.spatial.regions import region_mask
from tests.metrics._reference import blobs, ref_boundary_band, ref_edges


@pytest.mark.parametrize("shape", [(23, 19), (11, 13, 9), (1, 7, 6)])
def test_mask_edges_match_scipy_with_background_border(shape) -> None:
    rng = np.random.default_rng(0)
    for density in (0.3, 0.7, 1.0):
        mask = rng.random(shape) < density
        np.testing.assert_array_equal(mask_edges(torch.from_numpy(mask)).numpy(), ref_edges(mask))


@pytest.mark.parametrize("shape", [(40, 33), (14, 12, 10)])
def test_label_edges_are_the_union_of_class_edges(shape) -> None:
    labels = blobs(shape, 4, np.random.default_rng(1), coarse=3)
    expected = np.zeros(shape, dtype=bool)
    for k in range(1, 4):
        expected |= ref_edges(labels == k)
    t = torch.from_numpy(labels)
    np.testing.assert_array_equal(label_edges(t, t != 0).numpy(), expected)
    np.testing.assert_array_equal(label_edges(t.to(torch.int16), t != 0).numpy(), expected)


@pytest.mark.parametrize(
    "spacing, radius",
    [((1.0, 1.0, 1.0), 2.0), ((1.0, 0.8, 2.5), 2.0), ((0.7, 1.3, 1.1), 3.3), ((2.0, 2.0, 2.0), 1.0), ((1.0, 1.0, 1.0), 0.0)],
)
def test_ellipsoid_dilation_equals_edt_threshold(spacing, radius) -> None:
    rng = np.random.default_rng(2)
    mask = rng.random((15, 17, 12)) < 0.01
    got = dilate_ellipsoid(torch.from_numpy(mask), spacing, radius).numpy()
    expected = ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius
    np.testing.assert_array_equal(got, expected)


def test_ellipsoid_rows_2d() -> None:
    rows = dict(ellipsoid_rows((1.0, 1.0), 2.0))
    assert rows == {(-2,): 0, (-1,): 1, (0,): 2, (1,): 1, (2,): 0}


@pytest.mark.parametrize(
    "shape, spacing, width",
    [((48, 40), (0.7, 1.3), 2.0), ((20, 22, 14), (1.0, 0.8, 2.5), 2.0), ((16, 16, 16), (1.0, 1.0, 1.0), 3.0)],
)
def test_boundary_band_matches_scipy_reference(shape, spacing, width) -> None:
    labels = blobs(shape, 3, np.random.default_rng(3), coarse=4)
    got = boundary_band(torch.from_numpy(labels), spacing, width).numpy()
    expected = ref_boundary_band(labels, spacing, width)
    np.testing.assert_array_equal(got, expected)
    assert 0 < got.sum() < got.size
    # both sides of the boundary are in the band
    assert got[labels == 0].any() and got[labels != 0].any()


def test_boundary_band_small_object_and_empty() -> None:
    labels = np.zeros((30, 30, 30), dtype=np.int64)
    labels[14:16, 10:13, 20] = 2
    got = boundary_band(torch.from_numpy(labels), (1.0, 0.8, 2.5), 2.0).numpy()
    np.testing.assert_array_equal(got, ref_boundary_band(labels, (1.0, 0.8, 2.5), 2.0))
    empty = boundary_band(torch.zeros(8, 8, dtype=torch.long), (1.0, 1.0), 2.0)
    assert not empty.any()


def test_region_registry() -> None:
    assert {"all", "foreground", "boundary"} <= set(available_regions())
    target = torch.tensor([[[0, 1], [2, 255]]])
    context = RegionContext(target=target, spacing=[(1.0, 1.0)], num_classes=3, ignore_index=255)
    assert region_mask("all", context) is None
    assert region_mask("foreground", context).tolist() == [[[False, True], [True, False]]]

    @register_region("test_class_two")
    def _class_two(ctx: RegionContext) -> torch.Tensor:
        return ctx.target == 2

    assert region_mask("test_class_two", context).sum() == 1
    with pytest.raises(ValueError):
        register_region("test_class_two")(_class_two)
    with pytest.raises(ValueError):
        region_mask("missing", context)


def test_custom_region_in_the_metric() -> None:
    from segcalib.metrics import CalibrationMetric

    @register_region("test_left_half")
    def _left(ctx: RegionContext) -> torch.Tensor:
        mask = torch.zeros_like(ctx.target, dtype=torch.bool)
        mask[..., : ctx.target.shape[-1] // 2] = True
        return mask

    probs = torch.rand(2, 3, 6, 8).softmax(1)
    target = torch.randint(0, 3, (2, 6, 8))
    metric = CalibrationMetric(3, regions=("test_left_half", "all"))
    metric.update(probs, target)
    out = calibration_json(metric.compute())
    assert out["test_left_half"]["n_voxels"] == 2 * 6 * 4 and out["all"]["n_voxels"] == 2 * 6 * 8
    half = CalibrationMetric(3, regions=("all",))
    half.update(probs[..., :4].contiguous(), target[..., :4].contiguous())
    assert out["test_left_half"]["ece"] == pytest.approx(calibration_json(half.compute())["all"]["ece"], rel=1e-12)
