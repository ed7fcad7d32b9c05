"""Marginal L1 average calibration error (mL1-ACE) as a loss, hard or soft binned, alone or with Dice / CE.

Semantics of MONAI PR #9092 (``HardL1ACELoss`` / ``SoftL1ACELoss``) and of the reference code
``cai4cai/Average-Calibration-Losses``: ``p = softmax(logits)`` and one-hot targets; for every image
b and class c on its own, the probabilities ``p_c`` of the image's voxels go into ``num_bins`` equal
bins on ``[0, 1 + eps32]`` (``eps32`` = float32 machine epsilon, so that ``p = 1`` falls in the last
bin); the loss of (b, c) is the unweighted mean over occupied bins of ``|mean p - mean [y == c]|``;
(b, c) pairs whose class is absent from the image count as 0 in the final mean over (B, C).

- Hard bins: bin j holds ``edge_j < p <= edge_{j+1}`` (``torch.bucketize``, ``right=False``); a bin
  is occupied when it holds a voxel. The bin assignment has no gradient; the bin means do.
- Soft bins: each ``p`` is split between the two neighbouring bin centres by linear interpolation
  (all of it to the first / last bin below the first / above the last centre); bins whose total
  weight is below ``empty_weight`` are left out. The weights are differentiable.

The ``(B, C, bins)`` sums come from :mod:`segcalib.losses._calibration_bins`: one histogram pass of
per-cell moments (count, sum p, sum p^2) and a gather in backward; no ``(voxels, C, bins)``
membership tensor, one byte per voxel and class kept between forward and backward. Ignored voxels
add nothing anywhere.

Barfoot et al., "Average Calibration Losses for Reliable Uncertainty in Medical Image
Segmentation", arXiv 2506.03942 (IEEE TMI 2026); MICCAI 2024.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from segcalib.losses._calibration_bins import binned_sums
from segcalib.losses._checks import check_bool, check_float, check_int
from segcalib.losses._inputs import LossInputs
from segcalib.losses.base import CalibrationLoss
from segcalib.losses.dice import soft_dice_loss
from segcalib.losses.registry import register_loss


def l1_average_calibration_error(
    inputs: LossInputs,
    num_bins: int = 20,
    soft: bool = False,
    empty_weight: float = 0.01,
    include_background: bool = True,
    ignore_empty_classes: bool = True,
    probs: Tensor | None = None,
) -> Tensor:
    """Mean over images and classes of the per-(image, class) L1-ACE (see the module docstring).

    A class absent from an image (or, with ``ignore_empty_classes=False``, an image without any
    occupied bin) contributes 0; ``include_background=False`` drops class 0 from the mean.
    ``probs``: the softmax of the logits ``(B, C, *spatial)`` when the caller has it already.
    """
    logits = inputs.logits
    batch, classes = logits.shape[:2]
    if not include_background and classes < 2:
        raise ValueError("L1-ACE without background needs at least 2 classes")
    source = (logits if probs is None else probs).reshape(batch, classes, -1)
    labels = inputs.target.reshape(batch, -1)
    sum_p, sum_y, counts = binned_sums(source, labels, inputs.ignore_index, num_bins, soft, from_logits=probs is None)
    occupied = counts > 0
    if soft:
        occupied &= counts >= empty_weight
    safe = torch.where(occupied, counts, 1.0)
    gap = (sum_p / safe - sum_y / safe).abs()
    n_occupied = occupied.sum(-1)
    per_class = torch.where(occupied, gap, 0.0).sum(-1) / n_occupied.clamp_min(1)
    counted = n_occupied > 0
    if ignore_empty_classes:
        counted &= sum_y.sum(-1) > 0  # every voxel of class c adds a total weight 1 to sum_y
    per_class = torch.where(counted, per_class, 0.0)
    return (per_class if include_background else per_class[:, 1:]).mean().to(logits.dtype)


@register_loss("hardl1ace")
class HardL1ACELoss(CalibrationLoss):
    """Hard-binned marginal L1-ACE (MONAI PR #9092 ``HardL1ACELoss(softmax=True, to_onehot_y=True)``):
    per image and class, the mean over occupied bins of ``|mean p - mean y|``; 20 bins on
    ``[0, 1 + eps32]``; absent classes count 0 in the mean over (B, C).

    The combinations (``hardl1ace_dice``, ``_ce``, ``_dice_ce``) add weighted Dice / CE terms:
    ``loss = ace_weight * ace + dice_weight * dice + ce_weight * ce`` (weights of the reference
    bundles). Barfoot et al., arXiv 2506.03942. Components: ``ace`` (and ``dice``, ``ce``).
    """

    soft: bool = False
    squared_dice: bool = False  # the *_dice_ce bundles use MONAI's Dice with squared_pred, smooth_nr = 0

    def __init__(
        self,
        *,
        num_bins: int = 20,
        include_background: bool = True,
        ignore_empty_classes: bool = True,
        ignore_index: int = -100,
    ) -> None:
        super().__init__(ignore_index=ignore_index)
        self.num_bins = check_int(self.name, "num_bins", num_bins, low=1)
        self.include_background = check_bool(self.name, "include_background", include_background)
        self.ignore_empty_classes = check_bool(self.name, "ignore_empty_classes", ignore_empty_classes)
        self.empty_weight = 0.0
        self.weights: dict[str, float] = {"ace": 1.0}

    def _set_weights(self, **weights: Any) -> None:
        self.weights = {key: check_float(self.name, f"{key}_weight", value, low=0.0) for key, value in weights.items()}

    def compute(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        # one softmax for every term: with CE, exp(log_softmax) (CE is nll_loss(log_softmax), as F.cross_entropy);
        # ACE alone takes the softmax itself (its backward then writes one tensor the logits' size, not two)
        log_p = inputs.logits.log_softmax(1) if "ce" in self.weights else None
        shared = len(self.weights) > 1
        probs = None if not shared else inputs.logits.softmax(1) if log_p is None else log_p.exp()
        ace = l1_average_calibration_error(
            inputs, self.num_bins, self.soft, self.empty_weight, self.include_background, self.ignore_empty_classes,
            probs=probs,
        )
        parts = {"ace": ace}
        if "dice" in self.weights:
            smooth_nr = 0.0 if self.squared_dice else None
            parts["dice"] = soft_dice_loss(
                inputs, self.include_background, squared=self.squared_dice, smooth_nr=smooth_nr, probs=probs
            )
        if log_p is not None:
            nll = F.nll_loss(log_p, inputs.target, ignore_index=self.ignore_index, reduction="sum")
            parts["ce"] = nll / inputs.count
        if self.squared_dice and not bool(inputs.valid.any()):
            # smooth_nr = 0 makes the Dice of an empty class 1, not 0: a batch without a valid voxel is 0 here too
            parts = {key: value * 0 for key, value in parts.items()}
        total = sum(self.weights[key] * value for key, value in parts.items())
        return total, parts

    def extra_repr(self) -> str:
        weights = ", ".join(f"{k}_weight={v}" for k, v in self.weights.items())
        return f"num_bins={self.num_bins}, include_background={self.include_background}, {weights}, {super().extra_repr()}"


@register_loss("softl1ace")
class SoftL1ACELoss(HardL1ACELoss):
    """Soft-binned marginal L1-ACE (MONAI PR #9092 ``SoftL1ACELoss``): each probability is shared
    between its two neighbouring bin centres by linear interpolation; bins of total weight below
    ``empty_weight`` (0.01) are left out. Components: ``ace`` (and ``dice``, ``ce``)."""

    soft = True

    def __init__(self, *, empty_weight: float = 0.01, **params: Any) -> None:
        super().__init__(**params)
        self.empty_weight = check_float(self.name, "empty_weight", empty_weight, low=0.0)


@register_loss("hardl1ace_dice")
class HardL1ACEDiceLoss(HardL1ACELoss):
    """``0.5 * hard L1-ACE + 0.5 * Dice`` (the reference bundle ``hardl1ace_dice``; Dice as ``dice``)."""

    def __init__(self, *, ace_weight: float = 0.5, dice_weight: float = 0.5, **params: Any) -> None:
        super().__init__(**params)
        self._set_weights(ace=ace_weight, dice=dice_weight)


@register_loss("softl1ace_dice")
class SoftL1ACEDiceLoss(SoftL1ACELoss):
    """``0.5 * soft L1-ACE + 0.5 * Dice`` (the reference bundle ``softl1ace_dice``; Dice as ``dice``)."""

    def __init__(self, *, ace_weight: float = 0.5, dice_weight: float = 0.5, **params: Any) -> None:
        super().__init__(**params)
        self._set_weights(ace=ace_weight, dice=dice_weight)


@register_loss("hardl1ace_ce")
class HardL1ACECrossEntropyLoss(HardL1ACELoss):
    """``0.5 * hard L1-ACE + 0.5 * CE`` (the reference bundle ``hardl1ace_ce``)."""

    def __init__(self, *, ace_weight: float = 0.5, ce_weight: float = 0.5, **params: Any) -> None:
        super().__init__(**params)
        self._set_weights(ace=ace_weight, ce=ce_weight)


@register_loss("softl1ace_ce")
class SoftL1ACECrossEntropyLoss(SoftL1ACELoss):
    """``0.5 * soft L1-ACE + 0.5 * CE`` (the reference bundle ``softl1ace_ce``)."""

    def __init__(self, *, ace_weight: float = 0.5, ce_weight: float = 0.5, **params: Any) -> None:
        super().__init__(**params)
        self._set_weights(ace=ace_weight, ce=ce_weight)


@register_loss("hardl1ace_dice_ce")
class HardL1ACEDiceCrossEntropyLoss(HardL1ACELoss):
    """``0.33 * (hard L1-ACE + Dice + CE)`` (the reference bundle ``hardl1ace_dice_ce``), its Dice
    with squared probabilities and no numerator constant: ``1 - 2 sum pg / (sum p^2 + sum g + 1e-5)``."""

    squared_dice = True

    def __init__(
        self, *, ace_weight: float = 0.33, dice_weight: float = 0.33, ce_weight: float = 0.33, **params: Any
    ) -> None:
        super().__init__(**params)
        self._set_weights(ace=ace_weight, dice=dice_weight, ce=ce_weight)


@register_loss("softl1ace_dice_ce")
class SoftL1ACEDiceCrossEntropyLoss(SoftL1ACELoss):
    """``0.33 * (soft L1-ACE + Dice + CE)`` (the reference bundle ``softl1ace_dice_ce``; Dice as in
    ``hardl1ace_dice_ce``)."""

    squared_dice = True

    def __init__(
        self, *, ace_weight: float = 0.33, dice_weight: float = 0.33, ce_weight: float = 0.33, **params: Any
    ) -> None:
        super().__init__(**params)
        self._set_weights(ace=ace_weight, dice=dice_weight, ce=ce_weight)
