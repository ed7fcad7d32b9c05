"""Margin-based label smoothing (MbLS): penalise logit distances beyond a margin."""

from __future__ import annotations

from torch import Tensor

from segcalib.losses._checks import check_float
from segcalib.losses._inputs import LossInputs
from segcalib.losses._margin_ce import penalised_cross_entropy
from segcalib.losses._penalties import Margin
from segcalib.losses.base import CalibrationLoss
from segcalib.losses.dice import soft_dice_loss
from segcalib.losses.registry import register_loss


@register_loss("mbls")
class MarginLoss(CalibrationLoss):
    """``CE + alpha * mean_{i,k} relu(d_ik - m)``, ``d_ik = max_j z_ij - z_ik`` (SPEC §1 ``mbls``,
    m = 10, alpha = 0.1).

    The mean runs over valid voxels x all C classes, the winner included (its d is 0), as in
    the reference code, so ``alpha = C * lambda_paper``; m = 0 gives the equality-constraint
    penalty. Liu et al., "The Devil is in the Margin", CVPR 2022; Murugesan et al., MedIA 87
    (2023). Components: ``ce``, ``penalty`` (the mean, before alpha).
    """

    def __init__(self, *, margin: float = 10.0, alpha: float = 0.1, ignore_index: int = -100) -> None:
        super().__init__(ignore_index=ignore_index)
        self.margin = check_float(self.name, "margin", margin, low=0.0)
        self.alpha = check_float(self.name, "alpha", alpha, low=0.0)

    def compute(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        loss, ce, penalty = penalised_cross_entropy(inputs, Margin(), self.margin, weight=self.alpha)
        return loss, {"ce": ce, "penalty": penalty}

    def extra_repr(self) -> str:
        return f"margin={self.margin}, alpha={self.alpha}, {super().extra_repr()}"


@register_loss("mbls_dice")
class MarginDiceLoss(MarginLoss):
    """``CE + Dice (without background) + alpha * mean_{i,k} relu(d_ik - m)`` (SPEC §1 ``mbls``
    variant of Murugesan et al., MedIA 87, 2023). Components: ``ce``, ``dice``, ``penalty``.
    """

    def compute(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        loss, ce, penalty = penalised_cross_entropy(inputs, Margin(), self.margin, weight=self.alpha)
        dice = soft_dice_loss(inputs, include_background=False)
        return loss + dice, {"ce": ce, "dice": dice, "penalty": penalty}
