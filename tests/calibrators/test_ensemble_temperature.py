"""Ensemble temperature scaling: the closed form, recovery of a known mixture, NLL against Fiducio."""

from __future__ import annotations

import pytest
import torch

from segcalib.calibrators import build_calibrator
from segcalib.calibrators.ensemble_temperature import EnsembleTemperatureScaling
from tests.calibrators._helpers import mean_nll, miscalibrated
from tests.calibrators._single_thread import single_thread  # noqa: F401 (autouse fixture)

C = 4


def _mixture(z: torch.Tensor, t: float, w: list[float]) -> torch.Tensor:
    z = z.double()
    return w[0] * torch.softmax(z / t, dim=1) + w[1] * torch.softmax(z, dim=1) + w[2] / z.shape[1]


def test_transform_is_the_closed_form() -> None:
    z = torch.randn(2, C, 5, 6, generator=torch.Generator().manual_seed(0)) * 4
    params = {"seed": 0, "max_voxels": 1000, "max_iter": 10, "temperature": 1.7, "weights": [0.5, 0.3, 0.2]}
    cal = EnsembleTemperatureScaling.from_params(C, params)
    assert torch.allclose(cal.transform(z).double(), _mixture(z, 1.7, [0.5, 0.3, 0.2]), atol=1e-7)


def _mixture_cases(seed: int, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        z = torch.randn(1, C, 16, 16, 8, generator=g) * 4
        p = _mixture(z, 2.5, [0.4, 0.4, 0.2])
        y = torch.multinomial(p[0].reshape(C, -1).T.float(), 1, generator=g).reshape(1, 16, 16, 8)
        out.append((z, y))
    return out


def test_fit_recovers_a_known_mixture_and_beats_temperature_scaling() -> None:
    train, test = _mixture_cases(1), _mixture_cases(2)
    ets, ts = build_calibrator("ensemble_temperature", C), build_calibrator("temperature", C)
    for z, y in train:
        ets.update(z, y)
        ts.update(z, y)
    ets.fit()
    ts.fit()
    params = ets.get_params()
    assert params["temperature"] == pytest.approx(ts.get_params()["temperature"])  # stage 1 is TS
    # T is fixed before the weights (sequential fit), so the weights are not the generating ones,
    # but the fitted mixture predicts about as well as the true one
    held_ets = sum(mean_nll(ets.transform(z), y) for z, y in test)
    held_ts = sum(mean_nll(ts.transform(z), y) for z, y in test)
    oracle = sum(mean_nll(_mixture(z, 2.5, [0.4, 0.4, 0.2]), y) for z, y in test)
    assert held_ets < held_ts * 0.99
    assert held_ets < oracle * 1.005


def test_nll_at_most_fiducio() -> None:
    """Fiducio 0.2's ETS (Adam, 200 steps per stage) on the same tensors: fitted and held-out NLL."""
    fiducio = pytest.importorskip("fiducio")
    logits, target, _ = miscalibrated((4, C, 12, 10, 6), seed=4)
    test_logits, test_target, _ = miscalibrated((4, C, 12, 10, 6), seed=5)
    ours = build_calibrator("ensemble_temperature", C)
    ours.update(logits, target)
    ours.fit()
    theirs = fiducio.EnsembleTemperatureScaling().fit(logits, target)
    fitted = mean_nll(ours.transform(logits), target), mean_nll(theirs.transform(logits), target)
    held = mean_nll(ours.transform(test_logits), test_target), mean_nll(theirs.transform(test_logits), test_target)
    assert fitted[0] <= fitted[1] * 1.01, fitted
    assert held[0] <= held[1] * 1.01, held
