"""Calibration losses for segmentation (SPEC §1-2), created by name.

>>> from segcalib.losses import build_loss
>>> loss = build_loss("mbls", margin=10.0, alpha=0.1)
>>> value = loss(logits, target)            # logits (B, C, *spatial), target (B, *spatial)
>>> loss.last_components                    # {"ce": ..., "penalty": ...}, detached

Every loss is a :class:`CalibrationLoss`; CALS and its heuristic variant are
:class:`AdaptiveLoss` es with ``accumulate(val_logits)`` / ``step()`` for the per-epoch update.
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

# Importing the modules registers their losses.
from segcalib.losses import (  # noqa: E402,F401  isort: skip
    cals,
    cross_entropy,
    dice,
    entropy_penalty,
    focal,
    label_smoothing,
    logit_penalty,
    margin,
    nacl,
    svls,
)

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
