"""Dice overlap per class from label maps (SPEC §4): ``2|P∩G| / (|P|+|G|)``, NaN when a class is
absent from both. Counts are exact integers, so streamed counts (:func:`dice_counts` summed over
batches or processes) give the same Dice as one pass.

Reference: Dice, "Measures of the amount of ecologic association between species", Ecology 1945.
"""

from __future__ import annotations

import torch

from segcalib.metrics.inputs import INCLUDE_BACKGROUND, prediction_labels


def dice_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int, batched: bool = True) -> torch.Tensor:
    """Per-class ``(intersection, |pred|, |target|)`` voxel counts.

    Args:
        pred: integer label map ``(B, *spatial)`` (``batched``) or ``(*spatial)``.
        target: integer label map of the same shape.
        num_classes: number of classes ``C``; labels must lie in ``0..C-1``.
        batched: whether dim 0 is the batch.

    Returns:
        int64 ``(B, C, 3)`` (or ``(C, 3)``) on the inputs' device.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if not batched:
        return dice_counts(pred.unsqueeze(0), target.unsqueeze(0), num_classes)[0]
    b = pred.shape[0]
    p = pred.reshape(b, -1).long()
    t = target.to(p.device).reshape(b, -1).long()
    for name, x in (("pred", p), ("target", t)):
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= num_classes):
            raise ValueError(f"{name} labels must lie in 0..{num_classes - 1}")
    case = torch.arange(b, device=p.device).view(b, 1) * (num_classes * num_classes)
    joint = torch.bincount((case + p * num_classes + t).view(-1), minlength=b * num_classes * num_classes)
    confusion = joint.view(b, num_classes, num_classes)  # [case, pred class, target class]
    inter = confusion.diagonal(dim1=1, dim2=2)
    return torch.stack([inter, confusion.sum(2), confusion.sum(1)], dim=-1)


def dice_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Dice from ``(..., 3)`` counts ``(intersection, |pred|, |target|)``; NaN where both are empty."""
    counts = counts.double()
    denom = counts[..., 1] + counts[..., 2]
    return torch.where(denom > 0, 2.0 * counts[..., 0] / denom, torch.full_like(denom, float("nan")))


def dice(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    include_background: bool = INCLUDE_BACKGROUND,
    batched: bool | None = None,
    spatial_dims: int | None = None,
) -> torch.Tensor:
    """Per-case, per-class Dice (MONAI's ``compute_dice`` shapes).

    Args:
        pred: ``(B, C, *spatial)`` probabilities or one-hot (floating; argmax over classes), or an
            integer label map ``(B, *spatial)`` / ``(B, 1, *spatial)``.
        target: integer labels ``(B, *spatial)`` or ``(B, 1, *spatial)``.
        num_classes: number of classes ``C`` (background included).
        include_background: keep class 0 (the package default, :data:`INCLUDE_BACKGROUND`).
        batched: ``True``: dim 0 of an integer map is the batch; ``False``: the maps are one case
            ``(*spatial)`` (any number of axes, e.g. flattened). ``None`` (default): decide from
            the shapes and refuse the one ambiguous input, 3-axis integer maps, which may be a
            batch of 2D slices ``(B, H, W)`` or one volume ``(D, H, W)``.
        spatial_dims: 2 or 3, the number of spatial axes; settles that ambiguity.

    Returns:
        float64 ``(B, C')`` (``(C',)`` with ``batched=False``), NaN where the class is absent
        from both; ``C' = C`` or ``C - 1`` without the background.
    """
    first = 0 if include_background else 1
    if batched is False:
        return dice_from_counts(dice_counts(pred, target, num_classes, batched=False))[first:]
    if not pred.is_floating_point() and batched is None and spatial_dims is None and pred.dim() == 3:
        raise ValueError(
            f"dice: an integer label map of shape {tuple(pred.shape)} may be a batch of 2D slices (B, H, W) or one "
            "volume (D, H, W); pass spatial_dims=2 or 3, batched=True/False, probabilities (B, C, *spatial) or "
            "labels with a channel axis (B, 1, *spatial)"
        )
    if spatial_dims is not None and not pred.is_floating_point():
        has_channel = pred.dim() == spatial_dims + 2 and pred.shape[1] == 1
        if pred.dim() != spatial_dims + 1 and not has_channel:
            raise ValueError(f"dice: pred of shape {tuple(pred.shape)} is not (B, *spatial) with {spatial_dims} spatial axes")
    labels, truth = prediction_labels(pred, target, num_classes)
    return dice_from_counts(dice_counts(labels, truth, num_classes))[:, first:]
