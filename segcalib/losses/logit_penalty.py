"""L1 penalty on the logits."""

from __future__ import annotations

from torch import Tensor

from segcalib.losses._checks import check_float
from segcalib.losses._inputs import LossInputs
from segcalib.losses.base import CalibrationLoss
from segcalib.losses.registry import register_loss


@register_loss("logit_l1")
class LogitL1Loss(CalibrationLoss):
    """``CE + alpha * mean_{i,k} |z_ik|`` (SPEC §1 ``logit_l1``, alpha = 0.01).

    ``penalty = mean |z|`` over valid voxels x classes. Liu et al., CVPR 2022 (MbLS), as the
    logit-penalty baseline. Components: ``ce``, ``penalty``.
    """

    def __init__(self, *, alpha: float = 0.01, ignore_index: int = -100) -> None:
        super().__init__(ignore_index=ignore_index)
        self.alpha = check_float(self.name, "alpha", alpha, low=0.0)

    def compute(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        ce = inputs.cross_entropy()
        penalty = inputs.class_mean(inputs.logits.abs())
        return ce + self.alpha * penalty, {"ce": ce, "penalty": penalty}

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, {super().extra_repr()}"
