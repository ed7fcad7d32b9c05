"""QU-BraTS uncertainty score per class (Mehta et al., "QU-BraTS: MICCAI BraTS 2020 Challenge on
Quantifying Uncertainty in Brain Tumor Segmentation", MELBA 2022), streamed.

Conventions (those of the challenge's evaluation code, RagMeh11/QU-BraTS ``BraTS_Seg_Uncertainty.py``):

- Each class ``k`` is a binary task: prediction ``argmax == k``, ground truth ``y == k``, evaluated
  on the voxels of the caller's mask (the challenge's brain mask). One uncertainty map serves every
  class (the challenge asks for one map per tumour sub-region).
- The uncertainty is scaled linearly to ``[0, 100]`` by the stated range ``[lo, hi]`` (``0`` most
  certain), values outside clamped.
- Thresholds ``τ ∈ (100, 75, 50, 25, 0)`` (the challenge's; configurable). At ``τ`` the voxels with
  uncertainty ``> τ`` (strictly) are filtered out; at ``τ = 100`` none is.
- ``Dice(τ)`` of the remaining voxels, ``2 TP / (2 TP + FP + FN)``, and **1 when there is no
  foreground left in either** (the challenge's convention, unlike segcalib's NaN for Dice).
- ``FTP(τ) = (TP - TP(τ)) / TP``, ``FTN(τ) = (TN - TN(τ)) / TN`` (filtered true positives and true
  negatives over all of them, unfiltered); 0 when there is no TP (TN) at all (the code divides by
  ``TP + eps``; segcalib divides exactly).
- AUCs by the trapezoid rule over the threshold axis normalised to ``[0, 1]`` (``τ / 100``), as the
  code's ``sklearn.metrics.auc(thresholds, values) / 100``.
- ``score = (AUC_Dice + (1 - AUC_FTP) + (1 - AUC_FTN)) / 3``, higher is better.

The challenge scores each case and averages over cases; the counts here add up across cases, so
a metric merged over cases gives the dataset-pooled variant (one confusion matrix), and a metric
per case gives the challenge's per-case score.

The state is, per *level* ``L`` (how many thresholds lie below the voxel's scaled uncertainty), a
``(C, C)`` confusion matrix ``[prediction, ground truth]``: a voxel remains at threshold ``τ_j``
(ascending) exactly when ``j >= L``, so the remaining confusion at ``τ_j`` is a cumulative sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from segcalib.metrics.inputs import INCLUDE_BACKGROUND

QU_BRATS_THRESHOLDS = (100.0, 75.0, 50.0, 25.0, 0.0)


def scale_to_100(uncertainty: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Uncertainty scaled linearly from ``value_range`` to ``[0, 100]`` (float64, clamped)."""
    lo, hi = value_range
    return (uncertainty.double() - lo).mul_(100.0 / (hi - lo)).clamp_(0.0, 100.0)


def qu_brats_levels(scaled: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """How many thresholds lie strictly below each scaled uncertainty (int64, ``0..T``)."""
    ascending = torch.tensor(sorted(thresholds), dtype=torch.float64, device=scaled.device)
    return torch.searchsorted(ascending, scaled.contiguous(), right=False)


def qu_brats_counts(
    levels: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, num_classes: int, n_thresholds: int
) -> torch.Tensor:
    """float64 ``(T + 1, C, C)`` voxel counts per level, prediction and ground truth (1D inputs)."""
    c = num_classes
    index = (levels * c + pred) * c + target
    counts = torch.bincount(index, minlength=(n_thresholds + 1) * c * c)
    return counts.view(n_thresholds + 1, c, c).double()


def _auc(x: torch.Tensor, y: torch.Tensor) -> float:
    order = torch.argsort(x)
    x, y = x[order], y[order]
    return float(((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2).sum())


def qu_brats_from_counts(
    counts: torch.Tensor, thresholds: Sequence[float], include_background: bool = INCLUDE_BACKGROUND
) -> dict[str, Any]:
    """The QU-BraTS curves, AUCs and score per class from :func:`qu_brats_counts` summed.

    Returns:
        ``{"thresholds": [τ...], "classes": {"k": {"dice", "ftp", "ftn": [per τ], "auc_dice",
        "auc_ftp", "auc_ftn", "score"}}, "score": mean score over the evaluated classes}``
        (classes ``1..C-1``, or all with ``include_background``; every class is listed).
    """
    counts = counts.double().cpu()
    ascending = sorted(float(t) for t in thresholds)
    order = [ascending.index(float(t)) for t in thresholds]  # report in the caller's order
    kept = torch.cumsum(counts, 0)[:-1][order]  # (T, C, C): voxels remaining at each threshold
    everything = counts.sum(0)
    x = torch.tensor([float(t) / 100.0 for t in thresholds], dtype=torch.float64)

    def confusion(m: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tp = m.diagonal(dim1=-2, dim2=-1)
        fp = m.sum(-1) - tp
        fn = m.sum(-2) - tp
        tn = m.sum((-2, -1)).unsqueeze(-1) - tp - fp - fn
        return tp, fp, fn, tn

    tp, fp, fn, tn = confusion(kept)  # (T, C)
    tp_all, _, _, tn_all = confusion(everything)  # (C,)
    denom = 2 * tp + fp + fn
    dice = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.ones_like(denom))
    ftp = torch.where(tp_all > 0, (tp_all - tp) / tp_all.clamp(min=1), torch.zeros_like(tp))
    ftn = torch.where(tn_all > 0, (tn_all - tn) / tn_all.clamp(min=1), torch.zeros_like(tn))
    classes: dict[str, Any] = {}
    num_classes = counts.shape[-1]
    for k in range(num_classes):
        auc_dice, auc_ftp, auc_ftn = _auc(x, dice[:, k]), _auc(x, ftp[:, k]), _auc(x, ftn[:, k])
        classes[str(k)] = {
            "dice": dice[:, k].tolist(),
            "ftp": ftp[:, k].tolist(),
            "ftn": ftn[:, k].tolist(),
            "auc_dice": auc_dice,
            "auc_ftp": auc_ftp,
            "auc_ftn": auc_ftn,
            "score": (auc_dice + (1 - auc_ftp) + (1 - auc_ftn)) / 3,
        }
    evaluated = range(0 if include_background or num_classes == 1 else 1, num_classes)
    scores = [classes[str(k)]["score"] for k in evaluated]
    return {"thresholds": [float(t) for t in thresholds], "classes": classes, "score": sum(scores) / len(scores)}
