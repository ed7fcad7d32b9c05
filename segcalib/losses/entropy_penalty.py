"""Confidence penalty: reward high-entropy predictions."""

from __future__ import annotations

from torch import Tensor

from segcalib.losses._checks import check_float
from segcalib.losses._inputs import LossInputs
from segcalib.losses.base import CalibrationLoss
from segcalib.losses.registry import register_loss

PROBABILITY_CLAMP = 1e-10


@register_loss("ecp")
class EntropyConfidencePenaltyLoss(CalibrationLoss):
    """``CE - alpha * mean_{i,k}(-p_ik log p_ik)`` with p clamped to [1e-10, 1 - 1e-10] (SPEC §1 ``ecp``,
    alpha = 0.1); the entropy is divided by C as in the MbLS reference code.

    ``loss = ce + alpha * penalty`` with ``penalty = -mean entropy / C``. Pereyra et al.,
    "Regularizing neural networks by penalizing confident output distributions", ICLR-W 2017.
    Components: ``ce``, ``penalty``.
    """

    def __init__(self, *, alpha: float = 0.1, ignore_index: int = -100) -> None:
        super().__init__(ignore_index=ignore_index)
        self.alpha = check_float(self.name, "alpha", alpha, low=0.0)

    def compute(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        ce = inputs.cross_entropy()
        p = inputs.logits.softmax(1).clamp(PROBABILITY_CLAMP, 1 - PROBABILITY_CLAMP)
        penalty = inputs.class_mean(p * p.log())
        return ce + self.alpha * penalty, {"ce": ce, "penalty": penalty}

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, {super().extra_repr()}"
