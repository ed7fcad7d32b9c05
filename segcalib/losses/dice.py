"""Soft Dice on the softmax, and the CE + Dice baseline."""

from __future__ import annotations

import torch
from torch import Tensor

from segcalib.losses._checks import check_bool
from segcalib.losses._inputs import LossInputs
from segcalib.losses.base import CalibrationLoss
from segcalib.losses.registry import register_loss

DICE_EPSILON = 1e-5


def soft_dice_loss(
    inputs: LossInputs,
    include_background: bool = True,
    eps: float = DICE_EPSILON,
    *,
    squared: bool = False,
    smooth_nr: float | None = None,
    probs: Tensor | None = None,
) -> Tensor:
    """``mean_{b,c} 1 - (2 sum p g + nr) / (sum p + sum g + eps)`` per sample b and class c.

    ``p = softmax(logits)`` and ``g`` the one-hot target, both zero on ignored voxels; the one-hot
    target is never materialised (intersections and counts are scattered by label).
    ``include_background=False`` drops class 0 from the mean (after the softmax over all classes).
    ``squared=True`` sums ``p^2`` in the denominator (MONAI's ``squared_pred``); ``smooth_nr`` is the
    numerator's constant (default ``eps``, MONAI's ``smooth_nr = smooth_dr``). ``probs``: the
    softmax of the logits ``(B, C, *spatial)`` when the caller has it already.
    """
    logits = inputs.logits
    batch, classes = logits.shape[:2]
    if not include_background and classes < 2:
        raise ValueError("Dice without background needs at least 2 classes")
    nr = eps if smooth_nr is None else smooth_nr
    probs = (logits.softmax(1) if probs is None else probs).reshape(batch, classes, -1)
    weight = inputs.weight.reshape(batch, -1)
    labels = inputs.labels.reshape(batch, -1)
    p_true = probs.gather(1, labels.unsqueeze(1)).squeeze(1) * weight
    zeros = probs.new_zeros(batch, classes)
    intersection = zeros.scatter_add(1, labels, p_true)
    target_sum = zeros.scatter_add(1, labels, weight)
    prob_sum = torch.bmm(probs.square() if squared else probs, weight.unsqueeze(2)).squeeze(2)
    dice = 1 - (2 * intersection + nr) / (prob_sum + target_sum + eps)
    return (dice if include_background else dice[:, 1:]).mean()


@register_loss("dice")
class DiceLoss(CalibrationLoss):
    """Soft Dice loss (SPEC §1 ``dice``): ``1 - (2 sum p g + eps)/(sum p + sum g + eps)``, eps = 1e-5,
    per sample and class, averaged; as MONAI's ``DiceLoss(softmax=True, batch=False)``.

    Milletari et al., "V-Net", 3DV 2016. Components: ``dice``.
    """

    def __init__(self, *, include_background: bool = True, ignore_index: int = -100) -> None:
        super().__init__(ignore_index=ignore_index)
        self.include_background = check_bool(self.name, "include_background", include_background)

    def compute(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        dice = soft_dice_loss(inputs, self.include_background)
        return dice, {"dice": dice}


@register_loss("ce_dice")
class CrossEntropyDiceLoss(CalibrationLoss):
    """``CE + Dice`` (SPEC §1 ``ce_dice``, the "CE+DSC" baseline). Components: ``ce``, ``dice``."""

    def __init__(self, *, include_background: bool = True, ignore_index: int = -100) -> None:
        super().__init__(ignore_index=ignore_index)
        self.include_background = check_bool(self.name, "include_background", include_background)

    def compute(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        ce = inputs.cross_entropy()
        dice = soft_dice_loss(inputs, self.include_background)
        return ce + dice, {"ce": ce, "dice": dice}
