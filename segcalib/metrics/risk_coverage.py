"""Does the uncertainty find the errors? Risk-coverage, AURC, AUROC and UEO from a streamed
histogram of uncertainty values (the functional pieces of :class:`~segcalib.metrics.uncertainty.UncertaintyMetric`).

Every voxel is a sample with an uncertainty ``u`` and an outcome *error* = ``argmax != ground
truth``. The state is one float64 histogram ``(n_bins, 2)`` of (correct, error) counts over
equal-width bins of a stated range ``[lo, hi]``: bin ``b = clamp(floor((u - lo) / w), 0, n_bins - 1)``
with ``w = (hi - lo) / n_bins``, i.e. bins ``[lo + b w, lo + (b + 1) w)``, the last one closed and
values outside the range clamped into the end bins. Counts are integers, so histograms of batches,
volumes and processes add up exactly, in any order.

- **Risk-coverage** (Geifman & El-Yaniv, NeurIPS 2017): voxels sorted by increasing uncertainty;
  at coverage ``k / N`` the risk is the error rate of the ``k`` most certain voxels.
  **AURC** = ``(1/N) Σ_{k=1..N} risk(k)``. Within a bin the order is unknown, so the histogram
  gives exact bounds: errors last within every bin (smallest AURC) and errors first (largest).
  :func:`aurc_from_histogram` returns both, their midpoint and half their gap; they coincide
  when no bin holds both a correct voxel and an error (e.g. every distinct value in its own bin).
  **E-AURC** = AURC minus the AURC of a perfect ranking (all errors last) (Geifman et al., ICLR 2019).
- **AUROC** of the uncertainty as a detector of errors (errors = positives): the probability that
  a random error is more uncertain than a random correct voxel, a tie (same bin) counting 1/2;
  equal to ``sklearn.metrics.roc_auc_score(error, u)`` whenever voxels share a bin exactly when
  they share a value.
- **UEO** (uncertainty-error overlap; Jungo & Reyes, "Assessing Reliability and Challenges of
  Uncertainty Estimations for Medical Image Segmentation", MICCAI 2019): Dice between the
  uncertainty mask ``u >= t`` and the error mask. :func:`ueo_curve` gives it at every bin edge
  ``t = lo + i w`` (``i = 0..n_bins``), whose maximum is the "best over thresholds" UEO.
"""

from __future__ import annotations

import math

import torch

EULER_GAMMA = 0.5772156649015329


def histogram_bins(uncertainty: torch.Tensor, value_range: tuple[float, float], n_bins: int) -> torch.Tensor:
    """Bin index (int64, same shape) of each uncertainty value, computed in float64."""
    lo, hi = value_range
    scaled = (uncertainty.double() - lo).mul_(n_bins / (hi - lo))
    return scaled.floor_().clamp_(0, n_bins - 1).long()


def _harmonic(x: torch.Tensor) -> torch.Tensor:
    """Harmonic numbers ``H(x) = Σ_{j=1..x} 1/j`` for whole ``x >= 0`` (float64), ``H(0) = 0``."""
    return torch.special.digamma(x + 1.0) + EULER_GAMMA


def aurc_from_histogram(histogram: torch.Tensor) -> dict[str, float]:
    """AURC bounds, E-AURC and the error rate from a ``(n_bins, 2)`` (correct, error) histogram.

    Within a bin of ``n`` voxels (``e`` errors, ``c = n - e`` correct) after ``K`` voxels holding
    ``E`` errors, position ``j`` has coverage ``K + j`` and the sums ``Σ_j errors(K + j) / (K + j)``
    have closed forms in harmonic numbers: with errors first, ``E (H(K+n) - H(K)) + e - K (H(K+e) -
    H(K)) + e (H(K+n) - H(K+e))``; with errors last, ``E (H(K+n) - H(K)) + e - (K+c) (H(K+n) - H(K+c))``.

    Returns:
        ``{"aurc", "aurc_bound", "aurc_min", "aurc_max", "aurc_optimal", "e_aurc", "voxels",
        "errors", "error_rate"}``: ``aurc`` is the midpoint of ``[aurc_min, aurc_max]`` and
        ``aurc_bound`` half its width; NaN when the histogram is empty.
    """
    h = histogram.double().cpu()
    correct, errors = h[:, 0], h[:, 1]
    n = correct + errors
    total, total_errors = float(n.sum()), float(errors.sum())
    if total == 0:
        keys = ("aurc", "aurc_bound", "aurc_min", "aurc_max", "aurc_optimal", "e_aurc", "error_rate")
        return {**dict.fromkeys(keys, math.nan), "voxels": 0, "errors": 0}
    keep = n > 0
    n, e, c = n[keep], errors[keep], correct[keep]
    before = torch.cumsum(n, 0) - n  # K
    errors_before = torch.cumsum(e, 0) - e  # E
    h_k, h_kn = _harmonic(before), _harmonic(before + n)
    base = errors_before * (h_kn - h_k)
    last = e - (before + c) * (h_kn - _harmonic(before + c))
    h_ke = _harmonic(before + e)
    first = e - before * (h_ke - h_k) + e * (h_kn - h_ke)
    first = torch.where((e > 0) & (c > 0), first, last)  # a bin of one outcome has one order
    aurc_min = float((base + last).sum()) / total
    aurc_max = float((base + first).sum()) / total
    n_correct = total - total_errors
    h_all = _harmonic(torch.tensor([total, n_correct], dtype=torch.float64))
    optimal = (total_errors - n_correct * float(h_all[0] - h_all[1])) / total  # all errors last
    aurc = 0.5 * (aurc_min + aurc_max)
    return {
        "aurc": aurc,
        "aurc_bound": 0.5 * (aurc_max - aurc_min),
        "aurc_min": aurc_min,
        "aurc_max": aurc_max,
        "aurc_optimal": optimal,
        "e_aurc": aurc - optimal,
        "voxels": int(total),
        "errors": int(total_errors),
        "error_rate": total_errors / total,
    }


def risk_coverage_curve(histogram: torch.Tensor, value_range: tuple[float, float]) -> dict[str, torch.Tensor]:
    """The risk-coverage curve at the end of each non-empty bin (exact there).

    Returns float64 ``{"coverage", "risk", "threshold"}``: the fraction of voxels kept, their error
    rate, and the upper edge of the bin (voxels with ``u`` below it are kept).
    """
    h = histogram.double().cpu()
    n = h.sum(1)
    keep = n > 0
    lo, hi = value_range
    edges = lo + (hi - lo) * torch.arange(1, h.shape[0] + 1, dtype=torch.float64) / h.shape[0]
    kept = torch.cumsum(n, 0)[keep]
    kept_errors = torch.cumsum(h[:, 1], 0)[keep]
    total = float(n.sum()) if n.numel() else 0.0
    return {
        "coverage": kept / total if total else kept,
        "risk": kept_errors / kept,
        "threshold": edges[keep],
    }


def auroc_from_histogram(histogram: torch.Tensor) -> float:
    """AUROC of the uncertainty for detecting errors (ties within a bin count 1/2); NaN without
    both errors and correct voxels."""
    h = histogram.double().cpu()
    correct, errors = h[:, 0], h[:, 1]
    n_correct, n_errors = float(correct.sum()), float(errors.sum())
    if n_correct == 0 or n_errors == 0:
        return math.nan
    correct_below = torch.cumsum(correct, 0) - correct
    wins = (errors * (correct_below + 0.5 * correct)).sum()
    return float(wins) / (n_correct * n_errors)


def ueo_curve(histogram: torch.Tensor, value_range: tuple[float, float]) -> dict[str, torch.Tensor]:
    """UEO (Dice of ``u >= t`` with the error mask) at every bin edge ``t = lo + i w``, ``i = 0..n_bins``.

    Returns float64 ``{"threshold", "ueo"}`` of length ``n_bins + 1``; NaN where both masks are empty.
    """
    h = histogram.double().cpu()
    n_bins = h.shape[0]
    zero = torch.zeros(1, dtype=torch.float64)
    above = torch.cat([torch.flip(torch.cumsum(torch.flip(h.sum(1), [0]), 0), [0]), zero])
    above_errors = torch.cat([torch.flip(torch.cumsum(torch.flip(h[:, 1], [0]), 0), [0]), zero])
    denom = above + h[:, 1].sum()
    ueo = torch.where(denom > 0, 2 * above_errors / denom.clamp(min=1), torch.full_like(denom, math.nan))
    lo, hi = value_range
    thresholds = lo + (hi - lo) * torch.arange(n_bins + 1, dtype=torch.float64) / n_bins
    return {"threshold": thresholds, "ueo": ueo}


def best_ueo(histogram: torch.Tensor, value_range: tuple[float, float]) -> tuple[float, float]:
    """The largest UEO over the bin edges and the (smallest) threshold reaching it; NaN, NaN when undefined."""
    curve = ueo_curve(histogram, value_range)
    ueo = curve["ueo"]
    valid = ~torch.isnan(ueo)
    if not bool(valid.any()):
        return math.nan, math.nan
    i = int(torch.argmax(torch.where(valid, ueo, torch.full_like(ueo, -1.0))))
    return float(ueo[i]), float(curve["threshold"][i])
