"""medpy compatibility: dc, hd, hd95, assd against medpy 0.5.2 on the same masks; absent-class conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from medpy.metric import binary as medpy

from segcalib.errors import ConfigError
from segcalib.metrics.medpy_compat import marginloss_hd, medpy_assd, medpy_dc, medpy_hd, medpy_hd95, per_class_scores
from tests.metrics._reference import blobs


@pytest.mark.parametrize(
    ("shape", "spacing"), [((40, 36), None), ((20, 22, 16), (1.0, 0.8, 2.5)), ((30, 34), (0.7, 1.3))]
)
def test_parity_with_medpy(shape, spacing) -> None:
    rng = np.random.default_rng(3)
    gt, pred = blobs(shape, 3, rng, coarse=6), blobs(shape, 3, rng, coarse=6)
    for k in (1, 2):
        a, b = pred == k, gt == k
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        assert medpy_dc(ta, tb) == pytest.approx(medpy.dc(a, b), abs=1e-15)
        assert medpy_hd(ta, tb, spacing) == pytest.approx(medpy.hd(a, b, spacing), abs=1e-12)
        assert medpy_hd95(ta, tb, spacing) == pytest.approx(medpy.hd95(a, b, spacing), abs=1e-12)
        assert medpy_assd(ta, tb, spacing) == pytest.approx(medpy.assd(a, b, spacing), abs=1e-12)


def test_empty_masks_follow_medpy() -> None:
    empty = np.zeros((8, 8), bool)
    full = empty.copy()
    full[2:5, 3:6] = True
    with np.errstate(invalid="ignore"):
        assert math.isnan(medpy.dc(empty, empty))  # NumPy >= 2: 0.0 / 0.0 in NumPy floats
    assert math.isnan(medpy_dc(empty, empty))
    assert medpy_dc(empty, full) == medpy.dc(empty, full) == 0.0
    with pytest.raises(RuntimeError):
        medpy.hd95(empty, full)
    with pytest.raises(ValueError, match="result"):
        medpy_hd95(empty, full)
    with pytest.raises(ConfigError, match="connectivity"):
        medpy_hd95(full, full, connectivity=2)


def test_per_class_conventions() -> None:
    # classes: 1 present in both, 2 only in the prediction, 3 only in the ground truth, 4 in neither
    gt = np.zeros((1, 12, 12), np.int64)
    pred = np.zeros_like(gt)
    gt[0, 2:6, 2:6] = 1
    pred[0, 3:7, 2:6] = 1
    pred[0, 8:10, 8:10] = 2
    gt[0, 8:10, 1:3] = 3
    spacing = (0.5, 2.0)
    ours = per_class_scores(torch.from_numpy(pred), torch.from_numpy(gt), 5, spacing, include_background=False)
    seed = per_class_scores(torch.from_numpy(pred), torch.from_numpy(gt), 5, spacing, include_background=False, convention="seed")
    dice1, hd1 = medpy.dc(pred[0] == 1, gt[0] == 1), medpy.hd95(pred[0] == 1, gt[0] == 1, spacing)
    np.testing.assert_allclose(ours["dice"][0].numpy(), [dice1, 0.0, 0.0, np.nan], atol=1e-15)
    np.testing.assert_allclose(ours["hd95"][0].numpy(), [hd1, np.inf, np.inf, np.nan], atol=1e-12)
    np.testing.assert_allclose(seed["dice"][0].numpy(), [dice1, 1.0, 0.0, 1.0], atol=1e-15)
    np.testing.assert_allclose(seed["hd95"][0].numpy(), [hd1, 0.0, 0.0, 0.0], atol=1e-12)
    assert dice1 == pytest.approx(2 * 12 / 32) and math.isfinite(hd1)
    with pytest.raises(ConfigError, match="convention"):
        per_class_scores(torch.from_numpy(pred), torch.from_numpy(gt), 5, convention="medpy")


def test_marginloss_hd_reproduces_the_bitwise_count_test() -> None:
    # class 1: 3 and 5 voxels (3 & 5 = 1) -> medpy hd; class 2: 4 and 8 voxels (4 & 8 = 0) -> 0
    # although both are present; class 3: only in the ground truth -> 0
    gt = np.zeros((1, 12, 12), np.int64)
    pred = np.zeros_like(gt)
    pred[0, 1, 1:4] = 1
    gt[0, 2, 1:6] = 1
    pred[0, 6, 6:10] = 2
    gt[0, 8:10, 5:9] = 2
    gt[0, 11, 0] = 3
    got = marginloss_hd(torch.from_numpy(pred), torch.from_numpy(gt), 4)
    assert got.shape == (1, 4)
    assert float(got[0, 1]) == pytest.approx(medpy.hd(pred[0] == 1, gt[0] == 1), abs=1e-12)
    assert float(got[0, 1]) == pytest.approx(math.sqrt(1 + 4))  # gt voxel (2, 5) to pred voxel (1, 3)
    assert float(got[0, 2]) == 0.0 and medpy.hd(pred[0] == 2, gt[0] == 2) > 0
    assert float(got[0, 3]) == 0.0
    assert float(got[0, 0]) == pytest.approx(medpy.hd(pred[0] == 0, gt[0] == 0), abs=1e-12)  # 137 & 130 = 128
