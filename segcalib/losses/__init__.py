"""Calibration losses for segmentation (SPEC §1-2), created by name.

>>> from segcalib.losses import build_loss
>>> loss = build_loss("mbls", margin=10.0, alpha=0.1)
>>> value = loss(logits, target)            # logits (B, C, *spatial), target (B, *spatial)
>>> loss.last_components                    # {"ce": ..., "penalty": ...}, detached

Every loss is a :class:`CalibrationLoss`; CALS, its heuristic variant and CRaC are
:class:`AdaptiveLoss` es with ``accumulate(val_logits, val_target)`` / ``step()`` for the per-epoch update.
"""

from segcalib.losses.base import AdaptiveLoss, CalibrationLoss
from segcalib.losses.registry import (
    REQUIRED,
    build_loss,
    check_loss_params,
    list_losses,
    loss_parameters,
    register_loss,
)
from segcalib.utils.plugins import import_submodules

import_submodules(__name__, __path__, framework={"base", "registry"})  # registers every loss

__all__ = [
    "REQUIRED",
    "AdaptiveLoss",
    "CalibrationLoss",
    "build_loss",
    "check_loss_params",
    "list_losses",
    "loss_parameters",
    "register_loss",
]
