"""The two procedures that turn empirical risk curves into a parameter with a guarantee.

- Conformal risk control (Angelopoulos, Bates, Fisch, Lei, Schuster, "Conformal Risk Control",
  ICLR 2024, Thm. 1): for losses in [0, B] that do not increase as the set grows, and
  ``R̂_n(λ)`` the mean loss of ``n`` exchangeable calibration cases,
  ``λ̂ = inf{λ : n/(n+1) · R̂_n(λ) + B/(n+1) <= α}`` gives ``E[L_{n+1}(λ̂)] <= α``
  (expectation over the calibration cases and the new case). Needs ``B/(n+1) <= α``.
- Learn then Test (Angelopoulos, Bates, Candès, Jordan, Lei, 2021): each grid point is the null
  ``H_j: R(λ_j) > α``, tested with the Hoeffding–Bentkus p-value
  ``p_j = min(exp(-n h1(min(R̂_j, α), α)), e · P(Binom(n, α) <= ceil(n R̂_j)))``,
  ``h1(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b))``, valid for losses in [0, 1]; fixed-sequence
  testing from the smallest mask up (stop at the first ``p_j > δ``) bounds the family-wise error
  by ``δ``: with probability ``>= 1 - δ`` over the calibration cases every selected ``λ_j`` has
  ``R(λ_j) <= α``. No monotonicity is needed.

Grids run in the order of :mod:`segcalib.conformal.grids`: the mask grows with the index.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom

from segcalib.errors import ConfigError


def check_level(name: str, value: float) -> float:
    """``value`` as a float strictly inside (0, 1), else a ConfigError naming ``name``."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a number") from None
    if not (0.0 < value < 1.0):
        raise ConfigError(f"{name}: {value!r} is outside (0, 1)")
    return value


def crc_min_cases(alpha: float, bound: float = 1.0) -> int:
    """The fewest calibration cases for which CRC can return anything but the whole image:
    ``B/(n+1) <= α``."""
    return max(0, math.ceil(bound / alpha - 1 - 1e-12))


def ltt_min_cases(alpha: float, delta: float) -> int:
    """The fewest cases for which even a zero empirical risk is rejected at ``δ``:
    ``(1-α)^n <= δ``."""
    return math.ceil(math.log(delta) / math.log1p(-alpha) - 1e-12)


def crc_bound(mean_loss: np.ndarray, n: int, bound: float = 1.0) -> np.ndarray:
    """``n/(n+1) · R̂_n + B/(n+1)`` per grid index."""
    return (n * np.asarray(mean_loss, dtype=np.float64) + bound) / (n + 1)


def crc_index(mean_loss: np.ndarray, n: int, alpha: float, bound: float = 1.0) -> int | None:
    """The smallest grid index ``j`` such that the CRC bound is ``<= α`` at ``j`` and at every
    larger index (for a monotone risk: the first index where it holds); ``None`` if none."""
    ok = crc_bound(mean_loss, n, bound) <= alpha
    if not ok[-1]:
        return None
    failing = np.flatnonzero(~ok)
    return int(failing[-1] + 1) if failing.size else 0


def _h1(a: np.ndarray, b: float) -> np.ndarray:
    """``a log(a/b) + (1-a) log((1-a)/(1-b))`` for ``0 <= a <= b < 1`` (``0 log 0 = 0``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.where(a > 0, a * np.log(a / b), 0.0)
    return first + (1 - a) * np.log((1 - a) / (1 - b))


def hb_p_values(mean_loss: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """Hoeffding–Bentkus p-values of ``H_j: R(λ_j) > α`` from the mean losses ``R̂_j`` of ``n``
    cases (float64 ``(L,)``, each in [0, 1])."""
    r = np.clip(np.asarray(mean_loss, dtype=np.float64), 0.0, 1.0)
    hoeffding = np.exp(-n * _h1(np.minimum(r, alpha), alpha))
    bentkus = math.e * binom.cdf(np.ceil(n * r), n, alpha)
    return np.minimum(np.minimum(hoeffding, bentkus), 1.0)


def fixed_sequence(p_values: np.ndarray, delta: float) -> int | None:
    """The last index of the run of ``p_j <= δ`` that starts at index 0 (the smallest mask);
    ``None`` when ``p_0 > δ`` (nothing rejected: only the empty mask is certified)."""
    fail = np.flatnonzero(np.asarray(p_values) > delta)
    if fail.size == 0:
        return len(p_values) - 1
    return None if fail[0] == 0 else int(fail[0] - 1)
