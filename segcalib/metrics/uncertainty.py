"""Uncertainty quality: do the uncertain voxels carry the errors? Streamed and mergeable.

For any voxel-wise uncertainty map (predictive entropy, mutual information, ``1 - max p``, ...)
:class:`UncertaintyMetric` gives, over the voxels of a region (the caller's boolean mask; one
metric per region, and per case when per-case values are wanted):

- risk-coverage curve, **AURC** with its exact bounds, E-AURC, and **AUROC** of the uncertainty
  as an error detector, error = ``argmax != ground truth`` (:mod:`segcalib.metrics.risk_coverage`);
- **UEO** (Dice of the thresholded uncertainty with the error mask) at a fixed threshold (exact,
  voxels with ``u > t``) and the best over the histogram's bin edges (voxels with ``u >= t``);
- the **QU-BraTS** score per class (:mod:`segcalib.metrics.qu_brats`);
- the mean uncertainty, for the case-level correlation with Dice (:func:`uncertainty_dice_correlation`).

The state is a few float64 tensors of counts (a fine histogram of ``n_bins`` bins over the stated
``value_range``, a QU-BraTS confusion matrix per threshold level, a few sums), so batches, cases
and processes combine by summation (:meth:`UncertaintyMetric.merge`; ``compute()`` sums the
state of every process under torch.distributed itself) and the result does not depend on the order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from segcalib.metrics.inputs import INCLUDE_BACKGROUND
from scipy import stats

from segcalib.metrics.qu_brats import (
    QU_BRATS_THRESHOLDS,
    qu_brats_counts,
    qu_brats_from_counts,
    qu_brats_levels,
    scale_to_100,
)
from segcalib.metrics.risk_coverage import (
    aurc_from_histogram,
    auroc_from_histogram,
    best_ueo,
    histogram_bins,
    risk_coverage_curve,
)
from segcalib.metrics.state import SummableState
from segcalib.metrics.streaming import summed_copy

DEFAULT_BINS = 2**14
_CHUNK = 2**22  # voxels per pass: bounded float64 temporaries on large volumes


def max_uncertainty(kind: str, num_classes: int) -> float:
    """The largest value of an uncertainty map, for ``value_range = (0, max)``.

    ``entropy``, ``expected_entropy`` and ``mutual_info`` (nats): ``log C``; ``one_minus_max``
    (``1 - max_k p_k``): ``1 - 1/C``.
    """
    if num_classes < 2:
        raise ValueError(f"uncertainty needs num_classes >= 2, got {num_classes}")
    if kind in ("entropy", "expected_entropy", "mutual_info"):
        return math.log(num_classes)
    if kind == "one_minus_max":
        return 1.0 - 1.0 / num_classes
    raise ValueError(f"unknown uncertainty kind {kind!r}; known: entropy, expected_entropy, mutual_info, one_minus_max")


def foreground_union(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the voxels that the prediction or the ground truth calls foreground (label != 0)."""
    return (pred != 0) | (target != 0)


class UncertaintyMetric(SummableState):
    """Streamed uncertainty-quality metrics of one region (see the module docstring).

    Args:
        num_classes: number of classes ``C`` (labels ``0..C-1``).
        value_range: ``(lo, hi)`` of the uncertainty (e.g. ``(0, log C)`` for entropy, see
            :func:`max_uncertainty`); it sets the histogram bins and the QU-BraTS scale to [0, 100].
            Values outside it are clamped into the end bins and to 0 or 100.
        n_bins: histogram bins (default ``2**14``); AURC is exact when no bin holds both a correct
            voxel and an error, otherwise reported with its bound.
        ueo_threshold: the fixed UEO threshold, in uncertainty units (default: the middle of
            ``value_range``).
        qu_thresholds: QU-BraTS thresholds on the [0, 100] scale.
        include_background: whether the QU-BraTS mean score includes class 0.
    """

    def __init__(
        self,
        num_classes: int,
        value_range: tuple[float, float],
        n_bins: int = DEFAULT_BINS,
        ueo_threshold: float | None = None,
        qu_thresholds: Sequence[float] = QU_BRATS_THRESHOLDS,
        include_background: bool = INCLUDE_BACKGROUND,
    ) -> None:
        super().__init__()
        lo, hi = (float(v) for v in value_range)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"value_range must be finite with lo < hi, got {value_range!r}")
        if not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
        if len(qu_thresholds) < 2 or any(not 0 <= float(t) <= 100 for t in qu_thresholds):
            raise ValueError(f"qu_thresholds must be at least two values in [0, 100], got {qu_thresholds!r}")
        self.num_classes = num_classes
        self.value_range = (lo, hi)
        self.n_bins = n_bins
        self.ueo_threshold = 0.5 * (lo + hi) if ueo_threshold is None else float(ueo_threshold)
        self.qu_thresholds = tuple(float(t) for t in qu_thresholds)
        self.include_background = include_background
        self.add_state("histogram", (n_bins, 2))  # per bin: correct, errors
        self.add_state("sums", (3,))  # voxels, sum of uncertainty, errors
        self.add_state("ueo_counts", (2,))  # voxels with u > ueo_threshold, of them errors
        self.add_state("qu_counts", (len(self.qu_thresholds) + 1, num_classes, num_classes))

    def config(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "value_range": list(self.value_range),
            "n_bins": self.n_bins,
            "ueo_threshold": self.ueo_threshold,
            "qu_thresholds": list(self.qu_thresholds),
            "include_background": self.include_background,
        }

    @torch.no_grad()
    def update(
        self,
        uncertainty: torch.Tensor,
        pred: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Add the voxels of a batch.

        Args:
            uncertainty: float ``(B, *spatial)``, finite.
            pred: predicted labels ``(B, *spatial)`` (the argmax of the probabilities).
            target: ground-truth labels ``(B, *spatial)`` or ``(B, 1, *spatial)``.
            mask: optional boolean ``(B, *spatial)``: only these voxels count (the region).
        """
        if target.dim() == pred.dim() + 1 and target.shape[1] == 1:
            target = target[:, 0]
        shapes = {"uncertainty": uncertainty.shape, "pred": pred.shape, "target": target.shape}
        if mask is not None:
            shapes["mask"] = mask.shape
        if len(set(shapes.values())) != 1:
            raise ValueError(f"shapes differ: { {k: tuple(v) for k, v in shapes.items()} }")
        if not uncertainty.is_floating_point():
            raise ValueError(f"uncertainty must be a floating point map, got dtype {uncertainty.dtype}")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError("pred and target must hold integer labels")
        device = self.device
        u = uncertainty.detach().reshape(-1)
        p = pred.reshape(-1)
        t = target.reshape(-1)
        m = mask.reshape(-1).bool() if mask is not None else None
        batch: dict[str, torch.Tensor] = {}  # added to the state only once every chunk passed the checks
        for start in range(0, u.numel(), _CHUNK):
            chunk = slice(start, start + _CHUNK)
            m_chunk = None if m is None else m[chunk].to(device)
            stats = self._chunk_stats(u[chunk].to(device), p[chunk].to(device), t[chunk].to(device), m_chunk)
            for name, value in stats.items():
                batch[name] = batch[name] + value if name in batch else value
        self.add_to_state(batch)

    def _chunk_stats(
        self, u: torch.Tensor, p: torch.Tensor, t: torch.Tensor, m: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        if m is not None:
            u, p, t = u[m], p[m], t[m]
        if u.numel() == 0:
            return {}
        if not bool(torch.isfinite(u).all()):
            raise ValueError("uncertainty has NaN or infinite values")
        for name, labels in (("pred", p), ("target", t)):
            if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
                raise ValueError(f"{name} labels must lie in 0..{self.num_classes - 1}")
        p, t = p.long(), t.long()
        error = (p != t).long()
        bins = histogram_bins(u, self.value_range, self.n_bins)
        histogram = torch.bincount(bins * 2 + error, minlength=2 * self.n_bins).view(self.n_bins, 2)
        above = u.double() > self.ueo_threshold
        levels = qu_brats_levels(scale_to_100(u, self.value_range), self.qu_thresholds)
        n_errors = error.sum().double()
        return {
            "histogram": histogram.double(),
            "sums": torch.stack([u.new_tensor(u.numel(), dtype=torch.float64), u.double().sum(), n_errors]),
            "ueo_counts": torch.stack([above.sum(), (above & (error > 0)).sum()]).double(),
            "qu_counts": qu_brats_counts(levels, p, t, self.num_classes, len(self.qu_thresholds)),
        }

    def merge(self, other: UncertaintyMetric) -> UncertaintyMetric:
        """Add another metric's state (same configuration) to this one; returns ``self``."""
        if not isinstance(other, UncertaintyMetric) or other.config() != self.config():
            raise ValueError("can only merge UncertaintyMetric objects with the same configuration")
        self.merge_state(other)
        return self

    def reset(self) -> None:
        self.reset_state()

    def to_dict(self) -> dict[str, Any]:
        """Configuration and state as plain Python (JSON-serialisable), to save partial results."""
        return {"config": self.config(), "state": {name: t.cpu().tolist() for name, t in self.state_tensors().items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any], device: torch.device | str = "cpu") -> UncertaintyMetric:
        """Rebuild a metric saved with :meth:`to_dict`."""
        metric = cls(**data["config"]).to(device)
        for name, values in data["state"].items():
            getattr(metric, name).copy_(torch.tensor(values, dtype=torch.float64))
        return metric

    def risk_coverage(self) -> dict[str, torch.Tensor]:
        """The risk-coverage curve at the histogram's non-empty bins (see :func:`risk_coverage_curve`)."""
        return risk_coverage_curve(summed_copy(self.histogram), self.value_range)

    def compute(self) -> dict[str, Any]:
        """The metrics as plain Python numbers (NaN where undefined, e.g. AUROC without errors).

        Returns:
            ``{"voxels", "errors", "error_rate", "mean_uncertainty", "aurc", "aurc_bound",
            "aurc_min", "aurc_max", "aurc_optimal", "e_aurc", "auroc", "ueo", "ueo_threshold",
            "ueo_best", "ueo_best_threshold", "qu_brats": {...}}`` (``qu_brats`` as
            :func:`~segcalib.metrics.qu_brats.qu_brats_from_counts`). Under torch.distributed the
            state of every process is summed first (one collective; the local state is kept).
        """
        state = self.reduced_state_copy()
        histogram = state["histogram"]
        voxels, sum_u, errors = (float(v) for v in state["sums"].cpu())
        out: dict[str, Any] = aurc_from_histogram(histogram)
        out["mean_uncertainty"] = sum_u / voxels if voxels else math.nan
        out["auroc"] = auroc_from_histogram(histogram)
        above, above_errors = (float(v) for v in state["ueo_counts"].cpu())
        out["ueo"] = 2 * above_errors / (above + errors) if above + errors > 0 else math.nan
        out["ueo_threshold"] = self.ueo_threshold
        out["ueo_best"], out["ueo_best_threshold"] = best_ueo(histogram, self.value_range)
        out["qu_brats"] = qu_brats_from_counts(state["qu_counts"], self.qu_thresholds, self.include_background)
        return out


def uncertainty_dice_correlation(mean_uncertainty: Sequence[float], dice: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman correlation between cases' mean uncertainty and their Dice.

    A useful uncertainty correlates negatively (uncertain cases are the bad ones). Cases with a
    NaN in either value are left out; NaN when fewer than 3 cases remain or a value is constant.
    Spearman is Pearson on average ranks (ties share their mean rank), as ``scipy.stats.spearmanr``.

    Which voxels the mean runs over is the caller's choice: segcalib's evaluation uses the union
    of predicted and ground-truth foreground (:func:`foreground_union`), so that the background's
    near-zero uncertainty does not dilute it; all voxels is the other common choice.
    """
    u = np.asarray(mean_uncertainty, dtype=np.float64)
    d = np.asarray(dice, dtype=np.float64)
    if u.shape != d.shape or u.ndim != 1:
        raise ValueError(f"need one mean uncertainty per Dice, got {u.shape} and {d.shape}")
    keep = ~(np.isnan(u) | np.isnan(d))
    u, d = u[keep], d[keep]
    result = {"pearson": math.nan, "spearman": math.nan, "n_cases": int(keep.sum())}
    if len(u) >= 3 and np.ptp(u) > 0 and np.ptp(d) > 0:
        result["pearson"] = float(stats.pearsonr(u, d)[0])
        result["spearman"] = float(stats.spearmanr(u, d)[0])
    return result
