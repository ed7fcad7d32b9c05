"""Empirical validity over random calibration/test splits of a fixed pool of cases.

Under random splits the cases of a pool are exchangeable, so the guarantees hold exactly for
the pool: the mean over splits of the test risk at CRC's ``λ̂`` is ``<= α`` (and, for losses
without large jumps, ``>= α - B/(n+1)``), and Learn-then-Test selects a parameter whose pool
risk exceeds ``α`` in at most a fraction ``δ`` of the splits. Per-case losses are computed once
(``(N, L)``, one row per case); each split only averages rows, so thousands of splits are cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segcalib.conformal.control import crc_index, fixed_sequence, hb_p_values


@dataclass(frozen=True)
class SplitSummary:
    """``mean`` of the per-split values, its Monte-Carlo standard error ``se``, ``splits``."""

    mean: float
    se: float
    splits: int
    mean_size: float | None = None
    test_risk: float | None = None  # Learn-then-Test: mean test loss at the selected parameter


def _splits(n_pool: int, n_cal: int, splits: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((splits, n_pool)), axis=1)


def crc_split_risk(losses: np.ndarray, n_cal: int, alpha: float, splits: int = 1000, seed: int = 0,
                   sizes: np.ndarray | None = None) -> SplitSummary:
    """Mean over random splits of the mean test loss at the CRC parameter fitted on ``n_cal``
    cases (``losses`` float64 ``(N, L)``; ``sizes`` optional ``(N, L)`` relative mask sizes)."""
    orders = _splits(len(losses), n_cal, splits, seed)
    risks, size = np.empty(splits), np.empty(splits)
    for s, order in enumerate(orders):
        cal, test = order[:n_cal], order[n_cal:]
        j = crc_index(losses[cal].mean(0), n_cal, alpha)
        if j is None:
            raise ValueError(f"{n_cal} calibration cases are too few for alpha {alpha}")
        risks[s] = losses[test, j].mean()
        if sizes is not None:
            size[s] = sizes[test, j].mean()
    return SplitSummary(float(risks.mean()), float(risks.std(ddof=1) / np.sqrt(splits)), splits,
                        float(size.mean()) if sizes is not None else None)


def ltt_split_error(losses: np.ndarray, n_cal: int, alpha: float, delta: float, splits: int = 1000,
                    seed: int = 0, sizes: np.ndarray | None = None) -> SplitSummary:
    """Fraction of random splits in which Learn-then-Test (fixed sequence, fitted on ``n_cal``
    cases) selects a parameter whose risk over the whole pool exceeds ``alpha``; also the mean
    test loss and relative size at the selected parameter (the empty mask, loss 0, size 0,
    where nothing is selected)."""
    pool_risk = losses.mean(0)
    orders = _splits(len(losses), n_cal, splits, seed)
    errors, risks, size = np.zeros(splits), np.zeros(splits), np.zeros(splits)
    for s, order in enumerate(orders):
        j = fixed_sequence(hb_p_values(losses[order[:n_cal]].mean(0), n_cal, alpha), delta)
        if j is not None:
            errors[s] = pool_risk[: j + 1].max() > alpha  # every rejected null, not only the last
            risks[s] = losses[order[n_cal:], j].mean()
            if sizes is not None:
                size[s] = sizes[order[n_cal:], j].mean()
    return SplitSummary(float(errors.mean()), float(np.sqrt(max(delta * (1 - delta), 1e-12) / splits)), splits,
                        float(size.mean()) if sizes is not None else None, float(risks.mean()))
