"""Label smoothing with a uniform prior."""

from __future__ import annotations

from torch import Tensor

from segcalib.losses._checks import check_float
from segcalib.losses._inputs import LossInputs
from segcalib.losses.base import CalibrationLoss
from segcalib.losses.registry import register_loss


@register_loss("ls")
class LabelSmoothingLoss(CalibrationLoss):
    """Cross-entropy to the target ``(1 - eps) onehot + eps/C`` (SPEC §1 ``ls``, eps = 0.1).

    ``loss = (1 - eps) * ce + eps * penalty`` with ``penalty = mean_i (1/C) sum_k -log p_ik``
    (cross-entropy to the uniform distribution). Szegedy et al., CVPR 2016; Mueller et al.,
    "When does label smoothing help?", NeurIPS 2019. Components: ``ce``, ``penalty``.
    """

    def __init__(self, *, epsilon: float = 0.1, ignore_index: int = -100) -> None:
        super().__init__(ignore_index=ignore_index)
        self.epsilon = check_float(self.name, "epsilon", epsilon, low=0.0, high=1.0)

    def compute(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        log_p = inputs.logits.log_softmax(1)
        ce = inputs.mean(-log_p.gather(1, inputs.labels.unsqueeze(1)).squeeze(1))
        uniform = -inputs.class_mean(log_p)
        return (1 - self.epsilon) * ce + self.epsilon * uniform, {"ce": ce, "penalty": uniform}

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, {super().extra_repr()}"
