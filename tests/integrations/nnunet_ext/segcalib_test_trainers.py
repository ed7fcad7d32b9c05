"""Test trainers that nnU-Net imports through ``nnUNet_extTrainer`` (this folder, beside segcalib's).

``nnUNetTrainerSegcalibMbLS_Tiny`` is segcalib's MbLS trainer, unchanged but for the schedule (one
epoch of two training iterations and one validation iteration) and, as nnU-Net's own
``nnUNetTrainerNoMirroring``, no mirroring (neither augmentation nor test-time), so that a whole
nnU-Net run (train, ``--npz`` validation, predict) fits in a test. This module is imported by nnU-Net's own trainer
lookup, as a top-level module: it imports only segcalib and torch.
"""

from __future__ import annotations

import torch

from segcalib.integrations.nnunet.trainers import nnUNetTrainerSegcalibMbLS

TINY_SCHEDULE = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1}


class nnUNetTrainerSegcalibMbLS_Tiny(nnUNetTrainerSegcalibMbLS):
    """MbLS with nnU-Net's deep supervision, for :data:`TINY_SCHEDULE`'s epochs and iterations, no mirroring."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for name, value in TINY_SCHEDULE.items():
            setattr(self, name, value)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None
