"""Newton's method on 1/T against scipy's bounded scalar minimisation of the same float64 objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from segcalib.calibrators._newton import fit_inverse_temperature


def _reference(z: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    def nll(log_u: float) -> float:
        s = z * np.exp(log_u)
        return float((w * (logsumexp(s, axis=1) - s[np.arange(len(y)), y])).sum() / w.sum())

    return float(np.exp(minimize_scalar(nll, bounds=(-6, 6), method="bounded", options={"xatol": 1e-12}).x))


@pytest.mark.parametrize("scale, seed", [(3.0, 0), (0.3, 1), (12.0, 2)])  # over-, under-confident, extreme
def test_inverse_temperature_matches_scipy(scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n, c = 50_000, 4
    true = torch.randn(n, c, generator=g) * 2
    y = torch.multinomial(torch.softmax(true, 1), 1, generator=g).squeeze(1)
    z = true * scale + 0.1 * torch.randn(n, c, generator=g)
    w = torch.rand(n, generator=g) + 0.5
    u = fit_inverse_temperature(z, y.to(torch.int16), w)
    expected = _reference(z.double().numpy(), y.numpy(), w.double().numpy())
    assert u == pytest.approx(expected, rel=1e-5)
    assert u == pytest.approx(1 / scale, rel=0.1)  # the generating temperature, roughly
