"""L1-ACE computed the way its public reference code does, as the baseline of ``bench_losses``.

The reference (``cai4cai/Average-Calibration-Losses``, MONAI PR #9092) one-hot encodes the labels,
then loops over images and classes: ``torch.bucketize`` against float32 bin edges, and one
``scatter_add`` / ``scatter_reduce`` per statistic, in float32. This module follows the same plan,
written here for timing (it is what a user of the reference code would otherwise run); the
benchmark also prints its largest difference from segcalib's losses on the same input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS32 = float(torch.finfo(torch.float32).eps)


def _bin_sums(p: Tensor, y: Tensor, num_bins: int, soft: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(weight, sum p, sum y)`` per bin of one image and class (``p``, ``y``: ``(N,)`` float32)."""
    zeros = p.new_zeros(num_bins)
    if not soft:
        edges = torch.linspace(0.0, 1.0 + EPS32, num_bins + 1, device=p.device)
        index = torch.bucketize(p, edges[1:], right=False)
        counts = zeros.scatter_add(0, index, torch.ones_like(p))
        return counts, zeros.scatter_add(0, index, p), zeros.scatter_add(0, index, y)
    centres = (torch.arange(num_bins, device=p.device, dtype=p.dtype) + 0.5) * (1.0 + EPS32) / num_bins
    above = torch.bucketize(p, centres, right=False)  # centres strictly below p
    left = (above - 1).clamp(0, num_bins - 1)
    right = above.clamp(0, num_bins - 1)
    share = ((p - centres[left]) / (centres[right] - centres[left]).clamp_min(1e-12)).clamp(0, 1)
    share = torch.where(above == 0, 1.0, torch.where(above == num_bins, 0.0, share))  # ends: all to the end bin
    weights = ((left, 1 - share), (right, share))
    return (
        sum(zeros.scatter_add(0, i, w) for i, w in weights),
        sum(zeros.scatter_add(0, i, w * p) for i, w in weights),
        sum(zeros.scatter_add(0, i, w * y) for i, w in weights),
    )


def loop_l1ace(
    logits: Tensor, target: Tensor, num_bins: int = 20, soft: bool = False, empty_weight: float = 0.01
) -> Tensor:
    """Mean over images and classes of the mean over occupied bins of ``|mean p - mean y|``
    (absent classes 0): ``logits (B, C, *spatial)``, ``target (B, *spatial)`` int64."""
    batch, classes = logits.shape[:2]
    probs = logits.softmax(1).flatten(2).float()
    onehot = F.one_hot(target.flatten(1), classes).movedim(-1, 1).float()
    per_class = []
    for b in range(batch):
        for c in range(classes):
            weight, sum_p, sum_y = _bin_sums(probs[b, c], onehot[b, c], num_bins, soft)
            occupied = weight >= empty_weight if soft else weight > 0
            safe = torch.where(occupied, weight, 1.0)
            gap = torch.where(occupied, (sum_p / safe - sum_y / safe).abs(), torch.nan)
            present = onehot[b, c].sum() > 0
            per_class.append(torch.where(present, torch.nanmean(gap), 0.0))
    return torch.stack(per_class).mean()
