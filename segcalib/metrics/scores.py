"""Proper scoring rules per voxel: (root) Brier score and logarithmic score, per image and pooled.

- Brier score of a voxel: ``sum_k (p_k - [y == k])^2`` over the evaluated classes (all ``C``;
  ``1..C-1`` with ``include_background=False``), in ``[0, 2]``. Its mean over voxels is SPEC §3's
  Brier; the **root Brier score** (RBS, listed by Metrics Reloaded; Gruber & Buettner, "Better
  uncertainty calibration via proper scores for classification and beyond", NeurIPS 2022) is the
  square root of that mean.
- Log score (negative log-likelihood): ``-log max(p_y, eps)`` [eps = 1e-12, as SPEC's NLL].

Per image: the mean over the image's voxels (and its root). Pooled: sums over all voxels of all
images divided by their number -- the state is three float64 sums, so batches and processes merge
by summation. An image without voxels gives NaN.

Reference: Brier, "Verification of forecasts expressed in terms of probability", Monthly Weather
Review 1950; Good, "Rational decisions", JRSS B 1952 (log score).
"""

from __future__ import annotations

from typing import Any

import torch

from segcalib.metrics.inputs import INCLUDE_BACKGROUND, check_probs_target, evaluated_classes
from segcalib.metrics.state import SummableState
from segcalib.metrics.streaming import gathered_rows, summed_copy

SCORE_KEYS = ("brier", "root_brier", "log_score")


def score_sums(
    probs: torch.Tensor, labels: torch.Tensor, include_background: bool = INCLUDE_BACKGROUND, eps: float = 1e-12
) -> torch.Tensor:
    """Per image: sum of Brier, sum of log score, voxel count (float64 ``(B, 3)``).

    Args:
        probs: ``(B, C, *spatial)`` probabilities.
        labels: int64 ``(B, *spatial)`` labels in ``0..C-1``.
    """
    b, c = probs.shape[:2]
    p = probs.reshape(b, c, -1).double()
    y = labels.reshape(b, 1, -1)
    classes = torch.tensor(evaluated_classes(c, include_background), device=p.device)
    onehot = (y == classes.view(1, -1, 1)).double()
    brier = (p.index_select(1, classes) - onehot).square_().sum((1, 2))
    log = -p.gather(1, y).clamp_(min=eps).log_().sum((1, 2))
    n = torch.full((b,), float(p.shape[-1]), dtype=torch.float64, device=p.device)
    return torch.stack([brier, log, n], -1)


def scores_from_sums(sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """``brier``, ``root_brier``, ``log_score`` from ``(..., 3)`` sums (NaN where the count is 0)."""
    n = sums[..., 2]
    nan = torch.full_like(n, float("nan"))
    brier = torch.where(n > 0, sums[..., 0] / n.clamp(min=1), nan)
    log = torch.where(n > 0, sums[..., 1] / n.clamp(min=1), nan)
    return {"brier": brier, "root_brier": brier.sqrt(), "log_score": log}


def proper_scores(
    probs: torch.Tensor,
    target: torch.Tensor,
    include_background: bool = INCLUDE_BACKGROUND,
    per_image: bool = False,
    eps: float = 1e-12,
) -> dict[str, torch.Tensor]:
    """Brier, root Brier and log score of a batch.

    Args:
        probs: ``(B, C, *spatial)`` probabilities.
        target: ``(B, *spatial)`` or ``(B, 1, *spatial)`` integer labels.
        include_background: include class 0 in the Brier sum over classes.
        per_image: ``(B,)`` values per image instead of pooled 0-dim values.
        eps: floor on ``p_y`` inside the log.
    """
    probs, labels = check_probs_target(probs, target)
    sums = score_sums(probs, labels, include_background, eps)
    return scores_from_sums(sums if per_image else sums.sum(0))


def brier_score(
    probs: torch.Tensor, target: torch.Tensor, include_background: bool = INCLUDE_BACKGROUND, per_image: bool = False
) -> torch.Tensor:
    """Mean Brier score (see :func:`proper_scores`)."""
    return proper_scores(probs, target, include_background, per_image)["brier"]


def root_brier_score(
    probs: torch.Tensor, target: torch.Tensor, include_background: bool = INCLUDE_BACKGROUND, per_image: bool = False
) -> torch.Tensor:
    """Root Brier score: square root of the mean Brier score (see :func:`proper_scores`)."""
    return proper_scores(probs, target, include_background, per_image)["root_brier"]


def log_score(probs: torch.Tensor, target: torch.Tensor, per_image: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """Mean log score ``-log max(p_y, eps)`` (see :func:`proper_scores`)."""
    return proper_scores(probs, target, per_image=per_image, eps=eps)["log_score"]


class ScoreMetric(SummableState):
    """Streaming Brier / root Brier / log score: pooled float64 sums plus one row per image.

    ``compute()`` returns the pooled ``brier``, ``root_brier``, ``log_score`` (0-dim), the same per
    image (``(n_images,)`` in the order added, ranks in order under torch.distributed) and
    ``mean_root_brier`` (mean of the per-image RBS over images with voxels).
    """

    def __init__(self, num_classes: int, include_background: bool = INCLUDE_BACKGROUND, eps: float = 1e-12) -> None:
        super().__init__()
        evaluated_classes(num_classes, include_background)
        self.num_classes = num_classes
        self.include_background = include_background
        self.eps = eps
        self.add_state("sums", (3,))
        self._rows: list[list[float]] = []

    def _config(self) -> tuple[Any, ...]:
        return (self.num_classes, self.include_background, self.eps)

    @torch.no_grad()
    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``probs (B, C, *spatial)``, ``target (B, *spatial)`` or ``(B, 1, *spatial)``."""
        probs, labels = check_probs_target(probs, target, self.num_classes)
        if probs.device != self.device:
            self.to(probs.device)
        sums = score_sums(probs, labels, self.include_background, self.eps)
        self.add_to_state({"sums": sums.sum(0)})
        self._rows.extend(sums.cpu().tolist())

    def merge(self, other: ScoreMetric) -> ScoreMetric:
        super().merge(other)
        self._rows.extend(other._rows)
        return self

    def reset(self) -> None:
        super().reset()
        self._rows = []

    def compute(self) -> dict[str, Any]:
        out: dict[str, Any] = scores_from_sums(summed_copy(self.sums))
        rows = torch.tensor(gathered_rows(self._rows), dtype=torch.float64).view(-1, 3)
        per_image = scores_from_sums(rows)
        out["per_image"] = per_image
        rbs = per_image["root_brier"]
        out["mean_root_brier"] = rbs[~torch.isnan(rbs)].mean() if rbs.numel() else torch.tensor(float("nan"))
        return out
