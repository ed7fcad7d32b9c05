"""Brier, root Brier and log score against float64 NumPy loops; streaming equals functional."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segcalib.metrics.scores import ScoreMetric, brier_score, log_score, proper_scores, root_brier_score
from tests.metrics.test_calibration import make_batch


def ref_scores(probs: np.ndarray, target: np.ndarray, first: int = 0, eps: float = 1e-12) -> np.ndarray:
    """Per image (brier sum, log sum, n) with plain loops over voxels."""
    rows = []
    for p, y in zip(probs, target):
        c = p.shape[0]
        pf, yf = p.reshape(c, -1), y.reshape(-1)
        brier = sum(sum((pf[k, i] - (yf[i] == k)) ** 2 for k in range(first, c)) for i in range(yf.size))
        log = sum(-math.log(max(pf[yf[i], i], eps)) for i in range(yf.size))
        rows.append((brier, log, yf.size))
    return np.array(rows)


@pytest.mark.parametrize("include_background", [True, False])
def test_functional_matches_reference(include_background: bool) -> None:
    probs, target = make_batch((6, 7, 5), batch=3, dtype=torch.float64, seed=1)
    ref = ref_scores(probs.numpy(), target.numpy(), 0 if include_background else 1)
    per = proper_scores(probs, target, include_background, per_image=True)
    np.testing.assert_allclose(per["brier"].numpy(), ref[:, 0] / ref[:, 2], rtol=1e-12)
    np.testing.assert_allclose(per["root_brier"].numpy(), np.sqrt(ref[:, 0] / ref[:, 2]), rtol=1e-12)
    np.testing.assert_allclose(per["log_score"].numpy(), ref[:, 1] / ref[:, 2], rtol=1e-12)
    pooled = ref.sum(0)
    assert float(brier_score(probs, target, include_background)) == pytest.approx(pooled[0] / pooled[2], rel=1e-12)
    assert float(root_brier_score(probs, target, include_background)) == pytest.approx(math.sqrt(pooled[0] / pooled[2]), rel=1e-12)
    assert float(log_score(probs, target)) == pytest.approx(pooled[1] / pooled[2], rel=1e-12)


def test_hand_derived_two_voxels() -> None:
    # voxel 1: p = (0.75, 0.25), y = 0 -> Brier 2 * 0.25^2 = 0.125, log -log 0.75
    # voxel 2: p = (0, 1), y = 0 -> Brier 2, log -log 1e-12
    probs = torch.tensor([[0.75, 0.0], [0.25, 1.0]], dtype=torch.float64).view(1, 2, 2)
    target = torch.zeros(1, 2, dtype=torch.long)
    out = proper_scores(probs, target)
    assert float(out["brier"]) == pytest.approx(1.0625)
    assert float(out["root_brier"]) == pytest.approx(math.sqrt(1.0625))
    assert float(out["log_score"]) == pytest.approx((-math.log(0.75) - math.log(1e-12)) / 2)
    assert float(proper_scores(probs, target, include_background=False)["brier"]) == pytest.approx((0.0625 + 1) / 2)


def test_streaming_any_split_order_and_dtype() -> None:
    probs, target = make_batch((8, 8, 6), batch=4, seed=2)
    want = proper_scores(probs, target)
    want_per = proper_scores(probs, target, per_image=True)
    a, b = ScoreMetric(4), ScoreMetric(4)
    a.update(probs[:1], target[:1])
    b.update(probs[1:].double(), target[1:].unsqueeze(1))
    for first, second in ((a, b), (b, a)):
        got = ScoreMetric(4).merge(first).merge(second).compute()
        for key in ("brier", "root_brier", "log_score"):
            assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-12)
    got = ScoreMetric(4).merge(a).merge(b).compute()
    for key in ("brier", "root_brier", "log_score"):
        np.testing.assert_allclose(got["per_image"][key].numpy(), want_per[key].numpy(), rtol=1e-12)
    assert float(got["mean_root_brier"]) == pytest.approx(float(want_per["root_brier"].mean()), rel=1e-12)
    a.reset()
    empty = a.compute()
    assert math.isnan(float(empty["brier"])) and empty["per_image"]["brier"].numel() == 0
    with pytest.raises(ValueError):
        a.merge(ScoreMetric(4, include_background=False))
