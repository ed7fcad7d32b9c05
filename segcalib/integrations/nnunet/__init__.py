"""nnU-Net v2 trainers that train with a segcalib loss (``nnUNetv2_train ... -tr nnUNetTrainerSegcalibMbLS``).

nnU-Net finds trainers outside its package through ``nnUNet_extTrainer``: a folder whose modules it
imports by name. :func:`trainer_folder` is that folder; importing this package does not import
nnunetv2 (the trainers live in :mod:`segcalib.integrations.nnunet.trainers`).
"""

from __future__ import annotations

from pathlib import Path

from segcalib.integrations.nnunet.loss_spec import LOSS_ENV, PARAMS_ENV, TRAINER_LOSSES

__all__ = ["LOSS_ENV", "PARAMS_ENV", "TRAINER_LOSSES", "trainer_folder"]


def trainer_folder() -> Path:
    """The folder to put in ``nnUNet_extTrainer`` (inside the installed segcalib package)."""
    return Path(__file__).resolve().parent / "ext_trainers"
