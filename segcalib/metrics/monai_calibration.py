"""Class-wise calibration error per image in MONAI's convention (``monai.metrics.CalibrationErrorMetric``,
MONAI 1.6), from label maps, with float64 sums.

Per image ``b`` and class ``c`` (class 0 dropped with ``include_background=False``), every voxel
contributes ``p_c`` with outcome ``[y == c]``. The ``num_bins`` [20] bins are MONAI's: upper
edges ``torch.linspace(0, 1 + eps_float32, num_bins + 1)[1:]`` in float32, the probability cast
to float32 and placed with ``torch.bucketize(p, edges, right=right)`` clamped to the last bin --
with the default ``right=False`` a value equal to an edge goes to the bin *below* it, i.e. bins
are ``(left, right]`` (MONAI's docstring says the opposite; its code is what is followed here).
Then, over the non-empty bins, ``expected`` = sum_b n_b |mean_p - mean_y| / sum_b n_b (ECE),
``average`` = the plain mean (MONAI's "ACE"; not Nixon's adaptive ACE, see
:mod:`segcalib.metrics.adaptive`), ``maximum`` = the max (MCE). The values ``(B, C')`` are reduced
over images and classes as ``monai.metrics.utils.do_metric_reduction`` does (NaN left out;
a mean with no value is 0, as in MONAI).

Differences from MONAI, on purpose: the inputs are probabilities and integer labels (MONAI wants a
one-hot target); the per-bin sums are float64 (MONAI sums in float32), so results agree with
MONAI to about 1e-7 rather than bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from segcalib.metrics.adaptive import weighted_bins
from segcalib.metrics.inputs import INCLUDE_BACKGROUND, check_probs_target
from segcalib.metrics.streaming import gathered_rows

CALIBRATION_REDUCTIONS = ("expected", "average", "maximum")
METRIC_REDUCTIONS = ("none", "mean", "sum", "mean_batch", "sum_batch", "mean_channel", "sum_channel")


def _arg_validation(num_bins: int, calibration_reduction: str, metric_reduction: str | None = None) -> None:
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be an integer >= 1, got {num_bins!r}")
    if calibration_reduction not in CALIBRATION_REDUCTIONS:
        raise ValueError(f"calibration_reduction must be one of {CALIBRATION_REDUCTIONS}, got {calibration_reduction!r}")
    if metric_reduction is not None and metric_reduction not in METRIC_REDUCTIONS:
        raise ValueError(f"metric_reduction must be one of {METRIC_REDUCTIONS}, got {metric_reduction!r}")


def monai_bins(probs: torch.Tensor, num_bins: int, right: bool = False) -> torch.Tensor:
    """MONAI's bin index (int64, same shape as ``probs``) of float32-cast probabilities."""
    edges = torch.linspace(0.0, 1.0 + torch.finfo(torch.float32).eps, num_bins + 1, dtype=torch.float32, device=probs.device)
    return torch.bucketize(probs.float().contiguous(), edges[1:], right=right).clamp_(max=num_bins - 1)


def monai_bin_stats(
    probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 20, include_background: bool = INCLUDE_BACKGROUND, right: bool = False
) -> torch.Tensor:
    """Per image, class and bin: count, sum of ``p_c``, sum of ``[y == c]`` (float64 ``(B, C', M, 3)``)."""
    b, c = probs.shape[:2]
    first = 0 if include_background else 1
    p = probs.reshape(b, c, -1)
    y = labels.reshape(b, -1)
    rows = [
        torch.stack(
            [weighted_bins(monai_bins(p[i, k], num_bins, right), p[i, k], y[i] == k, num_bins) for k in range(first, c)]
        )
        for i in range(b)
    ]
    return torch.stack(rows) if rows else p.new_zeros((0, c - first, num_bins, 3), dtype=torch.float64)


def calibration_from_bins(stats: torch.Tensor, calibration_reduction: str = "expected") -> torch.Tensor:
    """Reduce ``(..., M, 3)`` bin statistics to ECE / average / maximum over non-empty bins (NaN if none)."""
    count = stats[..., 0]
    nonempty = count > 0
    safe = count.clamp(min=1)
    gap = (stats[..., 1] / safe - stats[..., 2] / safe).abs()
    n_nonempty = nonempty.sum(-1)
    nan = torch.full_like(gap[..., 0], float("nan"))
    if calibration_reduction == "expected":
        value = (gap * count).sum(-1) / count.sum(-1).clamp(min=1)
    elif calibration_reduction == "average":
        value = torch.where(nonempty, gap, torch.zeros_like(gap)).sum(-1) / n_nonempty.clamp(min=1)
    else:
        value = torch.where(nonempty, gap, torch.full_like(gap, -1.0)).amax(-1)
    return torch.where(n_nonempty > 0, value, nan)


def monai_reduction(values: torch.Tensor, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """``do_metric_reduction`` of MONAI on ``(B, C)`` values: ``(reduced, not_nans)``, NaN left out."""
    if reduction not in METRIC_REDUCTIONS:
        raise ValueError(f"metric_reduction must be one of {METRIC_REDUCTIONS}, got {reduction!r}")
    ok = ~torch.isnan(values)
    if reduction == "none":
        return values, ok.to(values.dtype)
    f = torch.where(ok, values, torch.zeros_like(values))
    zero = torch.zeros((), dtype=f.dtype, device=f.device)

    def mean(total: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return torch.where(n > 0, total / n.clamp(min=1), zero)

    if reduction == "mean":
        n_c = ok.sum(1).to(f.dtype)
        per_case = mean(f.sum(1), n_c)
        n_b = (n_c > 0).sum(0).to(f.dtype)
        return mean(per_case.sum(0), n_b), n_b
    if reduction == "sum":
        return f.sum((0, 1)), ok.sum((0, 1)).to(f.dtype)
    dim = 0 if reduction.endswith("batch") else 1
    n = ok.sum(dim).to(f.dtype)
    return (mean(f.sum(dim), n) if reduction.startswith("mean") else f.sum(dim)), n


def monai_calibration_error(
    probs: torch.Tensor,
    target: torch.Tensor,
    num_bins: int = 20,
    include_background: bool = INCLUDE_BACKGROUND,
    calibration_reduction: str = "expected",
    right: bool = False,
) -> torch.Tensor:
    """Per-image, per-class calibration error as ``CalibrationErrorMetric._compute_tensor``.

    Args:
        probs: ``(B, C, *spatial)`` probabilities.
        target: ``(B, *spatial)`` or ``(B, 1, *spatial)`` integer labels.
        num_bins: equal-width bins (MONAI's edges, see the module).
        include_background: keep class 0.
        calibration_reduction: ``expected`` (ECE), ``average`` or ``maximum`` (MCE).
        right: ``torch.bucketize``'s ``right`` as MONAI passes it.

    Returns:
        float64 ``(B, C')``, NaN for an image without voxels.
    """
    _arg_validation(num_bins, calibration_reduction)
    probs, labels = check_probs_target(probs, target)
    if not include_background and probs.shape[1] < 2:
        raise ValueError("include_background=False needs at least 2 classes")
    stats = monai_bin_stats(probs, labels, num_bins, include_background, right)
    return calibration_from_bins(stats, calibration_reduction)


class MonaiCalibrationError:
    """Streaming :func:`monai_calibration_error`: keeps the ``(C',)`` row of every image added.

    ``compute()`` gathers the rows of all processes (rank order) and applies ``metric_reduction``;
    with ``get_not_nans`` it returns ``(value, not_nans)`` as MONAI's ``aggregate``. Merging appends
    the other metric's rows, so any split of the images gives the same reduced value.
    """

    def __init__(
        self,
        num_bins: int = 20,
        include_background: bool = INCLUDE_BACKGROUND,
        calibration_reduction: str = "expected",
        metric_reduction: str = "mean",
        get_not_nans: bool = False,
        right: bool = False,
    ) -> None:
        _arg_validation(num_bins, calibration_reduction, metric_reduction)
        self.num_bins = num_bins
        self.include_background = include_background
        self.calibration_reduction = calibration_reduction
        self.metric_reduction = metric_reduction
        self.get_not_nans = get_not_nans
        self.right = right
        self._rows: list[list[float]] = []

    def _config(self) -> tuple[Any, ...]:
        return (self.num_bins, self.include_background, self.calibration_reduction, self.right)

    @torch.no_grad()
    def update(self, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Add a batch; returns its ``(B, C')`` values."""
        values = monai_calibration_error(
            probs, target, self.num_bins, self.include_background, self.calibration_reduction, self.right
        )
        self._rows.extend(values.cpu().tolist())
        return values

    def merge(self, other: MonaiCalibrationError) -> MonaiCalibrationError:
        if not isinstance(other, MonaiCalibrationError) or other._config() != self._config():
            raise ValueError("can only merge MonaiCalibrationError objects with the same configuration")
        self._rows.extend(other._rows)
        return self

    def reset(self) -> None:
        self._rows = []

    def compute(self, reduction: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Reduced values over every image added on every process (float64)."""
        rows = gathered_rows(self._rows)
        if not rows:
            raise ValueError("no images were added")
        values, not_nans = monai_reduction(torch.tensor(rows, dtype=torch.float64), reduction or self.metric_reduction)
        return (values, not_nans) if self.get_not_nans else values
