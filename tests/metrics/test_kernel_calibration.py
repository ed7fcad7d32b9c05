"""Kernel calibration error (SKCE) against a hand-derived case and an independent float64 NumPy loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segcalib.metrics.kernel_calibration import kernel_calibration_error, skce_pairs
from tests.metrics.test_calibration import make_batch


def ref_skce(p: np.ndarray, y: np.ndarray, nu: float, first: int = 0) -> tuple[float, float]:
    """Pair loop with the tensor-product (exponential x white) kernel form:
    h = k (delta(y_i, y_j) - p_i[y_j] - p_j[y_i] + <p_i, p_j>), restricted to classes >= first."""
    n, c = p.shape
    keep = np.arange(c) >= first
    total_off, total_diag = 0.0, 0.0
    for i in range(n):
        for j in range(n):
            k = math.exp(-math.sqrt(((p[i] - p[j]) ** 2).sum()) / nu)
            h = float(y[i] == y[j] and keep[y[i]]) - (p[i, y[j]] if keep[y[j]] else 0.0)
            h -= p[j, y[i]] if keep[y[i]] else 0.0
            h += float((p[i] * p[j])[keep].sum())
            if i == j:
                total_diag += k * h
            else:
                total_off += k * h
    return total_off / (n * (n - 1)), (total_off + total_diag) / (n * n)


def test_hand_derived_two_samples() -> None:
    # p1 = (0.8, 0.2), y1 = 0: r1 = (0.2, -0.2); p2 = (0.6, 0.4), y2 = 1: r2 = (-0.6, 0.6)
    # ||p1 - p2|| = sqrt(0.08); h12 = exp(-sqrt(0.08)) * (-0.24); h11 = 0.08; h22 = 0.72
    probs = torch.tensor([[0.8, 0.6], [0.2, 0.4]], dtype=torch.float64).view(1, 2, 2)
    target = torch.tensor([[0, 1]])
    out = kernel_calibration_error(probs, target, bandwidth=1.0)
    h12 = math.exp(-math.sqrt(0.08)) * -0.24
    assert float(out["skce_unbiased"]) == pytest.approx(h12, abs=1e-15)
    assert float(out["skce_biased"]) == pytest.approx((0.08 + 0.72 + 2 * h12) / 4, abs=1e-15)
    assert float(out["kce"]) == pytest.approx(math.sqrt((0.08 + 0.72 + 2 * h12) / 4), abs=1e-15)
    # a perfectly confident, correct prediction has residual 0: every term vanishes
    sure = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64).view(1, 2, 2)
    assert float(kernel_calibration_error(sure, torch.tensor([[0, 1]]))["skce_biased"]) == 0.0


@pytest.mark.parametrize("include_background", [True, False])
def test_matches_numpy_pair_loop(include_background: bool) -> None:
    probs, target = make_batch((6, 5, 4), batch=2, num_classes=3, dtype=torch.float64, seed=3)  # 240 voxels
    out = kernel_calibration_error(probs, target, bandwidth=0.7, include_background=include_background)
    p = probs.movedim(1, -1).reshape(-1, 3).numpy()
    y = target.reshape(-1).numpy()
    unbiased, biased = ref_skce(p, y, 0.7, 0 if include_background else 1)
    assert float(out["skce_unbiased"]) == pytest.approx(unbiased, rel=1e-10, abs=1e-15)
    assert float(out["skce_biased"]) == pytest.approx(biased, rel=1e-10, abs=1e-15)
    assert float(out["n_samples"]) == 240
    out32 = kernel_calibration_error(probs.float(), target, bandwidth=0.7, include_background=include_background)
    assert float(out32["skce_biased"]) == pytest.approx(biased, rel=1e-5)


def test_blocks_and_median_bandwidth() -> None:
    rng = np.random.default_rng(0)
    p = torch.from_numpy(rng.dirichlet(np.ones(3), 1500))
    r = torch.nn.functional.one_hot(torch.from_numpy(rng.integers(0, 3, 1500)), 3).double() - p
    off, diag = skce_pairs(p, r, 0.5)  # two row blocks
    k = torch.exp(-torch.cdist(p, p, compute_mode="donot_use_mm_for_euclid_dist") / 0.5)
    full = (k * (r @ r.T)).sum()
    assert float(off + diag) == pytest.approx(float(full), rel=1e-12)
    probs, target = make_batch((5, 4, 3), batch=1, num_classes=3, dtype=torch.float64)
    flat = probs.movedim(1, -1).reshape(-1, 3).numpy()
    d = np.sqrt(((flat[:, None] - flat[None]) ** 2).sum(-1))[np.triu_indices(60, 1)]
    med = kernel_calibration_error(probs, target, bandwidth="median")
    fixed = kernel_calibration_error(probs, target, bandwidth=float(np.median(d)))
    assert float(med["skce_unbiased"]) == pytest.approx(float(fixed["skce_unbiased"]), rel=1e-12)


def test_sample_bound() -> None:
    probs, target = make_batch((10, 10, 10), batch=1, seed=5)
    with pytest.raises(ValueError, match="max_samples"):
        kernel_calibration_error(probs, target, max_samples=500)
    a = kernel_calibration_error(probs, target, max_samples=500, sample=True, seed=3)
    b = kernel_calibration_error(probs, target, max_samples=500, sample=True, seed=3)
    assert float(a["n_samples"]) == 500 and float(a["skce_unbiased"]) == float(b["skce_unbiased"])
    one = kernel_calibration_error(probs[:, :, :1, :1, :1], target[:, :1, :1, :1])
    assert math.isnan(float(one["skce_unbiased"])) and float(one["n_samples"]) == 1
