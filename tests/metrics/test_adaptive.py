"""Adaptive (equal-mass) calibration error against plain float64 NumPy and hand-derived cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcalib.metrics.adaptive import AdaptiveCalibrationError, adaptive_calibration_error, equal_mass_from_atoms
from tests.metrics.test_calibration import make_batch


def ref_ace(scores: np.ndarray, outcomes: np.ndarray, n_bins: int) -> float:
    """Textbook ACE for N divisible by R and distinct scores: sort, cut into R equal chunks."""
    order = np.argsort(scores, kind="stable")
    s, o = scores[order], outcomes[order]
    return float(np.mean([abs(oc.mean() - sc.mean()) for sc, oc in zip(np.split(s, n_bins), np.split(o, n_bins))]))


def ref_samples(probs: np.ndarray, target: np.ndarray, mode: str, classes) -> list[tuple[np.ndarray, np.ndarray]]:
    c = probs.shape[1]
    p = np.moveaxis(probs, 1, -1).reshape(-1, c)
    y = target.reshape(-1)
    if mode == "top":
        return [(p.max(1), (p.argmax(1) == y).astype(float))]
    return [(p[:, k], (y == k).astype(float)) for k in classes]


@pytest.mark.parametrize("mode", ["top", "classwise"])
@pytest.mark.parametrize("include_background", [True, False])
def test_exact_matches_textbook_ace(mode: str, include_background: bool) -> None:
    probs, target = make_batch((12, 10, 8), batch=2, dtype=torch.float64, seed=3)  # 1920 voxels, R | N
    out = adaptive_calibration_error(probs, target, n_bins=15, mode=mode, include_background=include_background)
    classes = range(0 if include_background else 1, 4)
    refs = [ref_ace(s, o, 15) for s, o in ref_samples(probs.numpy(), target.numpy(), mode, classes)]
    np.testing.assert_allclose(out["ace_per_class"].numpy(), refs, rtol=1e-12, atol=1e-15)
    assert float(out["ace"]) == pytest.approx(np.mean(refs), rel=1e-12)
    assert float(out["bound"]) == 0.0


def test_ties_and_fractional_boundaries_hand_derived() -> None:
    # class 1 scores [0.2, 0.2, 0.2, 0.8], outcomes [1, 0, 0, 1], R = 2: bins of 2 samples.
    # bin 1: two of the three ties (conf 0.2, acc 1/3); bin 2: one tie + 0.8 (conf 0.5, acc 2/3)
    p1 = torch.tensor([0.2, 0.2, 0.2, 0.8], dtype=torch.float64)
    probs = torch.stack([1 - p1, p1]).view(1, 2, 4, 1)
    target = torch.tensor([1, 0, 0, 1]).view(1, 4, 1)
    out = adaptive_calibration_error(probs, target, n_bins=2, include_background=False)
    assert float(out["ace"]) == pytest.approx(0.5 * (abs(1 / 3 - 0.2) + abs(2 / 3 - 0.5)), abs=1e-15)
    # R = 3 on 4 samples: masses 4/3; bins 1 and 2 hold 4/3 of the ties each, bin 3 the last
    # 1/3 of the ties plus the 0.8 sample
    out3 = adaptive_calibration_error(probs, target, n_bins=3, include_background=False)
    bins = [(0.2, 1 / 3), (0.2, 1 / 3), ((0.2 / 3 + 0.8) / (4 / 3), (1 / 9 + 1) / (4 / 3))]
    assert float(out3["ace"]) == pytest.approx(np.mean([abs(a - c) for c, a in bins]), abs=1e-15)
    np.testing.assert_allclose(out3["conf"][0].numpy(), [b[0] for b in bins], atol=1e-15)


def test_histogram_within_stated_bound_of_exact() -> None:
    probs, target = make_batch((16, 16, 12), batch=2, seed=5)
    for mode in ("top", "classwise"):
        exact = adaptive_calibration_error(probs, target, mode=mode)
        approx = adaptive_calibration_error(probs, target, mode=mode, exact=False)
        err = abs(float(exact["ace"]) - float(approx["ace"]))
        assert err <= float(approx["bound"]) + 1e-15
        assert float(approx["bound"]) < 2e-3  # continuous scores: a boundary splits a thin cell
    # saturated scores (many exactly 0 / 1): the bound grows but still holds
    sat = probs.clone()
    sat[:, :, ::2] = torch.nn.functional.one_hot(target[:, ::2], 4).movedim(-1, 1).float()
    exact = adaptive_calibration_error(sat, target, mode="classwise")
    approx = adaptive_calibration_error(sat, target, mode="classwise", exact=False, n_cells=64)
    assert abs(float(exact["ace"]) - float(approx["ace"])) <= float(approx["bound"]) + 1e-15


def test_bound_covers_worst_case_within_a_cell() -> None:
    # one cell (width 1/4) holds all 4 samples; exact sorted order puts both hits first
    scores = torch.tensor([0.76, 0.77, 0.99, 1.0], dtype=torch.float64)
    outcomes = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    atoms = torch.stack([torch.ones(4, dtype=torch.float64), scores, outcomes], 1)
    exact = equal_mass_from_atoms(atoms, 2)
    cell = equal_mass_from_atoms(atoms.sum(0, keepdim=True), 2, cell_width=0.25)
    # exact: |1 - 0.765| and |0 - 0.995|; proportional split: both bins conf 0.88, acc 0.5
    assert float(exact["ace"]) == pytest.approx((0.235 + 0.995) / 2, abs=1e-15)
    assert float(cell["ace"]) == pytest.approx(0.38, abs=1e-15)
    assert float(cell["bound"]) == pytest.approx(2 * (2 * 2 / 4) * 1.25 / 4, abs=1e-15)
    assert abs(float(exact["ace"]) - float(cell["ace"])) <= float(cell["bound"])


@pytest.mark.parametrize("mode", ["top", "classwise"])
def test_streaming_equals_functional_any_split_and_dtype(mode: str) -> None:
    probs, target = make_batch((10, 9, 7), batch=4, seed=7)
    want = adaptive_calibration_error(probs, target, mode=mode, exact=False)
    parts = [AdaptiveCalibrationError(4, mode=mode) for _ in range(3)]
    parts[0].update(probs[:1], target[:1])
    parts[1].update(probs[1:3].double(), target[1:3].unsqueeze(1))  # float64 and (B, 1, *S) targets
    parts[2].update(probs[3:], target[3:])
    for order in ([0, 1, 2], [2, 0, 1]):
        merged = AdaptiveCalibrationError(4, mode=mode)
        for i in order:
            merged.merge(parts[i])
        got = merged.compute()
        for key in ("ace", "ace_per_class", "bound", "conf", "acc"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-14)
    merged.reset()
    assert torch.isnan(merged.compute()["ace"])
    with pytest.raises(ValueError):
        merged.merge(AdaptiveCalibrationError(4, mode=mode, n_bins=10))


def test_float32_and_float64_inputs_agree() -> None:
    probs, target = make_batch((8, 8, 6), batch=2, seed=9)
    a = adaptive_calibration_error(probs, target)
    b = adaptive_calibration_error(probs.double(), target)
    assert float(a["ace"]) == float(b["ace"])


def test_bad_inputs() -> None:
    probs, target = make_batch((4, 4, 4), batch=1)
    with pytest.raises(ValueError, match="mode"):
        adaptive_calibration_error(probs, target, mode="x")
    with pytest.raises(ValueError, match="labels"):
        adaptive_calibration_error(probs, target + 4)
    with pytest.raises(ValueError, match="n_bins"):
        AdaptiveCalibrationError(4, n_bins=0)
