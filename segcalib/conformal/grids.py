"""The parameter grids conformal control searches: probability thresholds and dilation radii.

Both are fixed before any data is seen (Learn-then-Test needs that; conformal risk control
allows it), and both are ordered so that the mask *grows* with the index: index 0 is the
smallest mask, the last index the whole image (risk 0 for the miss-rate risks), as the
papers' ``λ`` grows.

- thresholds ``t`` (mask ``p >= t``), from 1 down to 0: a uniform grid of step 1e-3 joined with
  a logistic grid (``sigmoid(s)``, ``s`` in [-16, 16], 1601 points) that resolves the
  probabilities near 0 and 1 where confident networks put most voxels. Every value is exactly
  representable in float32, so ``p >= t`` is the same comparison in float32 and float64.
  The paper's parameter is ``λ = 1 - t``.
- margins ``r`` in mm on the signed distance to the predicted mask (mask: voxels whose signed
  distance is ``<= r``; ``r > 0`` dilates, ``r < 0`` erodes, ``r = 0`` is the predicted mask),
  from ``-max_mm`` up to ``max_mm`` in steps of ``step_mm``, then ``inf`` (the whole image).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from segcalib.errors import ConfigError

UNIFORM_STEP = 1e-3
LOGIT_RANGE = 16.0
LOGIT_POINTS = 1601
DEFAULT_RADIUS_STEP_MM = 0.05
DEFAULT_RADIUS_MAX_MM = 20.0


@lru_cache(maxsize=1)
def _thresholds() -> np.ndarray:
    uniform = np.linspace(0.0, 1.0, int(round(1 / UNIFORM_STEP)) + 1)
    logistic = 1.0 / (1.0 + np.exp(-np.linspace(-LOGIT_RANGE, LOGIT_RANGE, LOGIT_POINTS)))
    values = np.unique(np.concatenate([uniform, logistic, [0.0, 1.0]]).astype(np.float32)).astype(np.float64)
    values = values[(values >= 0.0) & (values <= 1.0)]
    out = values[::-1].copy()  # descending: the mask grows with the index
    out.setflags(write=False)
    return out


def threshold_grid() -> np.ndarray:
    """Probability thresholds, float64, descending from 1.0 to 0.0 (read-only)."""
    return _thresholds()


def radius_grid(step_mm: float = DEFAULT_RADIUS_STEP_MM, max_mm: float = DEFAULT_RADIUS_MAX_MM) -> np.ndarray:
    """Signed margins in mm, ascending: ``-max_mm, ..., 0, step, ..., max_mm``, then ``inf``."""
    if not (np.isfinite(step_mm) and step_mm > 0):
        raise ConfigError(f"margin step: {step_mm!r} mm must be a finite number > 0")
    if not (np.isfinite(max_mm) and max_mm >= step_mm):
        raise ConfigError(f"margin max: {max_mm!r} mm must be finite and >= the step {step_mm:g} mm")
    count = int(np.floor(max_mm / step_mm + 1e-9))
    radii = np.round(np.arange(-count, count + 1) * step_mm, 9)
    return np.append(radii, np.inf)
