"""Smooth ECE: parity with relplot (the authors' package) on the same samples; the bounded grid form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import relplot
import torch

from segcalib.metrics.smooth_ece import SmoothECE, smooth_ece
from tests.metrics.test_calibration import make_batch


def flat(probs: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    c = probs.shape[1]
    return probs.movedim(1, -1).reshape(-1, c).double().numpy(), target.reshape(-1).numpy()


def binary(f: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 2, N) probabilities whose class-1 score is ``f``, labels ``y``."""
    return torch.from_numpy(np.stack([1 - f, f])).view(1, 2, -1), torch.from_numpy(y).long().view(1, -1)


@pytest.mark.parametrize("seed", [0, 1])
def test_top_label_parity_with_relplot(seed: int) -> None:
    probs, target = make_batch((12, 12, 10), batch=2, dtype=torch.float64, seed=seed)
    p, y = flat(probs, target)
    f, correct = relplot.multiclass_logits_to_confidences(p, y, probs=True)
    want, width = relplot.smECE(f, correct, return_width=True)
    got = smooth_ece(probs, target)
    assert float(got["smece"]) == pytest.approx(want, abs=1e-12)
    assert float(got["sigma"][0]) == width
    bounded = smooth_ece(probs, target, exact=False)  # sigma* >= 0.01: the fine grid nests relplot's
    assert float(bounded["smece"]) == pytest.approx(want, abs=1e-12)
    fixed = smooth_ece(probs.float(), target, sigma=0.05)  # float32 input, fixed bandwidth
    assert float(fixed["smece"]) == pytest.approx(relplot.smECE_sigma(f.astype(np.float32).astype(np.float64), correct, 0.05), abs=1e-12)


def test_classwise_is_mean_of_per_class_relplot() -> None:
    probs, target = make_batch((10, 9, 8), batch=1, num_classes=3, dtype=torch.float64, seed=4)
    p, y = flat(probs, target)
    got = smooth_ece(probs, target, mode="classwise", include_background=False)
    want = [relplot.smECE(p[:, k], (y == k).astype(float)) for k in (1, 2)]
    np.testing.assert_allclose(got["smece_per_class"].numpy(), want, atol=1e-12)
    assert float(got["smece"]) == pytest.approx(np.mean(want), abs=1e-12)


def test_small_bandwidth_bounded_error() -> None:
    # calibrated scores, many samples: sigma* < 0.01, where relplot's grid is not nested in ours
    rng = np.random.default_rng(1)
    f = rng.uniform(0.0, 1.0, 100_000)
    y = (rng.uniform(size=f.size) < f).astype(float)
    want, width = relplot.smECE(f, y, return_width=True)
    assert width < 0.01
    probs, target = binary(f, y)
    exact = smooth_ece(probs, target, mode="classwise", include_background=False)
    bounded = smooth_ece(probs, target, mode="classwise", include_background=False, exact=False)
    assert float(exact["smece"]) == pytest.approx(want, abs=1e-12)
    assert abs(float(bounded["smece"]) - want) < 1e-7  # measured 2.5e-9
    assert float(bounded["sigma"][0]) == width


def test_hand_derived_perfect_and_constant() -> None:
    # perfectly calibrated in the limit: every score 0.5 with half the outcomes 1 -> residuals cancel
    f = np.full(1000, 0.5)
    y = np.tile([0.0, 1.0], 500)
    probs, target = binary(f, y)
    got = smooth_ece(probs, target, mode="classwise", include_background=False)
    assert float(got["smece"]) == pytest.approx(0.0, abs=1e-12)
    # constant miscalibration: scores 0.9, never correct -> residual 0.9 everywhere -> smECE 0.9 at any sigma
    probs, target = binary(np.full(200, 0.9), np.zeros(200))
    got = smooth_ece(probs, target, mode="classwise", include_background=False, sigma=0.1)
    # the density floor 1e-4 only shifts the weights: |r| = 0.9 * dens / (dens + 1e-4) at each mesh point
    assert float(got["smece"]) == pytest.approx(0.9, rel=1e-5)
    assert float(got["smece"]) == pytest.approx(relplot.smECE_sigma(np.full(200, 0.9), np.zeros(200), 0.1), abs=1e-12)


def test_streaming_any_split_and_order() -> None:
    probs, target = make_batch((9, 8, 7), batch=4, seed=8)
    want = smooth_ece(probs, target, exact=False)
    parts = [SmoothECE(4), SmoothECE(4)]
    parts[0].update(probs[:3], target[:3])
    parts[1].update(probs[3:].double(), target[3:].unsqueeze(1))
    for order in ((0, 1), (1, 0)):
        merged = SmoothECE(4)
        for i in order:
            merged.merge(parts[i])
        got = merged.compute()
        assert float(got["smece"]) == pytest.approx(float(want["smece"]), abs=1e-12)
        assert float(got["sigma"][0]) == float(want["sigma"][0])
    merged.reset()
    assert math.isnan(float(merged.compute()["smece"]))
    with pytest.raises(ValueError):
        merged.merge(SmoothECE(4, mode="classwise"))
