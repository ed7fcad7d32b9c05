"""Cross-entropy, the task term of most calibration losses."""

from __future__ import annotations

from torch import Tensor

from segcalib.losses._inputs import LossInputs
from segcalib.losses.base import CalibrationLoss
from segcalib.losses.registry import register_loss


@register_loss("ce")
class CrossEntropyLoss(CalibrationLoss):
    """``mean_i -log p_{i, y_i}`` over the valid voxels (SPEC §1 ``ce``).

    Components: ``ce``.
    """

    def __init__(self, *, ignore_index: int = -100) -> None:
        super().__init__(ignore_index=ignore_index)

    def compute(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        ce = inputs.cross_entropy()
        return ce, {"ce": ce}
