"""Per-case counts on the grids against brute force, and the absent-class convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from segcalib.conformal.grids import radius_grid, threshold_grid
from segcalib.conformal.statistics import RiskSums, margin_counts, signed_distance, threshold_counts
from segcalib.spatial.morphology import dilate_ellipsoid
from tests.conformal._synthetic import SPACING, synthetic_case


def test_threshold_grid_is_descending_float32_exact_and_spans_0_to_1() -> None:
    t = threshold_grid()
    assert t[0] == 1.0 and t[-1] == 0.0 and np.all(np.diff(t) < 0)
    assert np.array_equal(t.astype(np.float32).astype(np.float64), t)  # p >= t is the same in float32 and float64
    assert t[1] > 1 - 1e-6 and t[-2] < 1e-6  # the logistic part resolves both ends


def test_threshold_counts_equal_brute_force_masks() -> None:
    probs, label = synthetic_case(3)
    t = threshold_grid()[::7]
    counts = threshold_counts(probs[1], label == 1, t)
    for j in range(0, len(t), 13):
        mask = probs[1] >= np.float32(t[j])  # compared in float32, as a viewer would
        assert counts.covered[j] == mask.sum()
        assert counts.hits[j] == (mask & (label == 1)).sum()
    assert counts.n_truth == (label == 1).sum() and counts.covered[-1] == probs[1].size
    fnr, fdr = counts.fnr(), counts.fdr()
    j = len(t) // 2
    mask = probs[1] >= t[j]
    assert fnr[j] == pytest.approx(1 - (mask & (label == 1)).sum() / (label == 1).sum(), abs=1e-15)
    assert fdr[j] == pytest.approx((mask & (label != 1)).sum() / max(mask.sum(), 1), abs=1e-15)
    assert np.all(np.diff(fnr) <= 0)  # the miss rate never grows with the mask


def test_signed_distance_masks_are_scipy_dilations_and_erosions() -> None:
    probs, _ = synthetic_case(5)
    pred = probs.argmax(0) == 1
    sd = signed_distance(pred, SPACING)
    outside = ndimage.distance_transform_edt(~pred, sampling=SPACING)
    inside = ndimage.distance_transform_edt(pred, sampling=SPACING)
    np.testing.assert_array_equal(sd, np.where(pred, -(inside - min(SPACING)), outside))
    for r in (1.2, 2.0, 3.1):  # dilation by r mm: segcalib's ellipsoid dilation, written independently
        np.testing.assert_array_equal(sd <= r, dilate_ellipsoid(torch.from_numpy(pred), SPACING, r).numpy())
    np.testing.assert_array_equal(sd <= 0, pred)
    np.testing.assert_array_equal(sd <= 0.99, pred)  # below the smallest spacing nothing is added
    # erosion by 1.2 mm keeps the voxels at least 1.2 mm below the outer layer (1 mm deep on the finest axis)
    np.testing.assert_array_equal(sd <= -1.2, pred & (inside >= 1.2 + 1.0))
    assert (sd < 0).sum() < pred.sum()  # the outer layer itself sits at 0


def test_margin_counts_and_the_whole_image_at_the_last_radius() -> None:
    probs, label = synthetic_case(7)
    pred, truth = probs.argmax(0) == 2, label == 2
    radii = radius_grid(0.5, 6.0)
    counts = margin_counts(pred, truth, SPACING, radii)
    sd = signed_distance(pred, SPACING)
    for j, r in enumerate(radii[:-1]):
        assert counts.covered[j] == (sd <= r).sum() and counts.hits[j] == ((sd <= r) & truth).sum()
    assert counts.covered[-1] == pred.size and counts.hits[-1] == truth.sum() and counts.fnr()[-1] == 0
    empty = margin_counts(np.zeros_like(pred), truth, SPACING, radii)  # nothing predicted: missed at every finite r
    assert np.all(empty.fnr()[:-1] == 1.0) and empty.fnr()[-1] == 0.0


def test_absent_class_is_left_out_and_counted_not_scored() -> None:
    probs, label = synthetic_case(1)
    t = threshold_grid()
    sums = RiskSums("fnr", len(t))
    present = threshold_counts(probs[1], label == 1, t)
    sums.add("a", present)
    sums.add("b", threshold_counts(probs[1], np.zeros_like(label, dtype=bool), t))
    assert sums.n == 1 and sums.absent == ["b"]
    np.testing.assert_array_equal(sums.mean_loss(), present.fnr())
    with pytest.raises(ValueError):
        threshold_counts(probs[1], np.zeros_like(label, dtype=bool), t).fnr()


def test_radius_grid_is_symmetric_and_ends_with_the_whole_image() -> None:
    r = radius_grid(0.25, 1.0)
    np.testing.assert_array_equal(r, [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, np.inf])
