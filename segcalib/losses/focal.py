"""Focal loss and its sample-dependent variant FLSD-53."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from segcalib.losses._checks import check_float
from segcalib.losses._inputs import LossInputs
from segcalib.losses.base import CalibrationLoss
from segcalib.losses.registry import register_loss


def _true_class_log_prob(inputs: LossInputs) -> Tensor:
    """``log p_y`` per voxel, a constant -1 on ignored voxels (keeps ``(1 - p)^gamma`` differentiable there)."""
    log_p = -F.cross_entropy(inputs.logits, inputs.target, ignore_index=inputs.ignore_index, reduction="none")
    return torch.where(inputs.valid, log_p, -1.0)


def focal_per_voxel(log_p: Tensor, gamma: Tensor | float) -> Tensor:
    """``-(1 - p)^gamma log p`` from ``log p`` (``1 - p`` as ``-expm1(log p)`` for accuracy near p = 1)."""
    return -(-torch.expm1(log_p)).pow(gamma) * log_p


@register_loss("focal")
class FocalLoss(CalibrationLoss):
    """``mean_i -(1 - p_y)^gamma log p_y`` (SPEC §1 ``focal``, gamma = 3).

    Lin et al., ICCV 2017; Mukhoti et al., "Calibrating deep neural networks using focal loss",
    NeurIPS 2020. Components: ``focal``.
    """

    def __init__(self, *, gamma: float = 3.0, ignore_index: int = -100) -> None:
        super().__init__(ignore_index=ignore_index)
        self.gamma = check_float(self.name, "gamma", gamma, low=0.0)

    def compute(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        focal = inputs.mean(focal_per_voxel(_true_class_log_prob(inputs), self.gamma))
        return focal, {"focal": focal}

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, {super().extra_repr()}"


@register_loss("focal_adaptive")
class AdaptiveFocalLoss(FocalLoss):
    """Focal loss with gamma = 5 on voxels where ``p_y < 0.2`` and ``gamma`` elsewhere
    (SPEC §1 ``focal_adaptive``, FLSD-53 of Mukhoti et al., NeurIPS 2020; the choice uses the
    detached ``p_y``). Components: ``focal``.
    """

    low_confidence = 0.2
    low_confidence_gamma = 5.0

    def compute(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        log_p = _true_class_log_prob(inputs)
        low = log_p.detach() < math.log(self.low_confidence)
        gamma = torch.where(low, self.low_confidence_gamma, self.gamma).to(log_p.dtype)
        focal = inputs.mean(focal_per_voxel(log_p, gamma))
        return focal, {"focal": focal}
