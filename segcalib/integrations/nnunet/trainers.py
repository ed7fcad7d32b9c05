"""nnU-Net v2 trainers that train with a segcalib loss, as nnU-Net trains with its own.

- The loss comes from segcalib's registry (:mod:`.loss_spec`: fixed per named trainer, or
  ``SEGCALIB_LOSS`` / ``SEGCALIB_LOSS_PARAMS`` for :class:`nnUNetTrainerSegcalib`), checked when the
  trainer is made, before nnU-Net creates any folder; nnU-Net's training log says which loss and
  parameters it runs with.
- Deep supervision is nnU-Net's own: its ``DeepSupervisionWrapper`` with the per-scale weights
  nnU-Net computes (``1/2^i``, the lowest scale 0, normalised to sum 1), around the segcalib loss.
  nnU-Net's ``ignore`` label becomes the loss's ``ignore_index``; region-based labels are refused.
- Adaptive losses (CALS, CRaC): every validation batch's full-resolution logits and labels go to
  ``accumulate`` (taken where nnU-Net's ``validation_step`` calls the loss: no second forward pass),
  ``step()`` runs at the end of each validation epoch (its sums are all-reduced under DDP), and the
  state is stored in nnU-Net's checkpoint under ``"segcalib_loss"`` (plain tensors and strings, so
  it loads with ``weights_only=True``) and restored by ``--c``.

CRaC's boundary band (``region="band"``) is measured in voxels of each deep-supervision scale
(``spacing`` None) unless ``SEGCALIB_LOSS_PARAMS`` sets ``spacing``, which then holds at every scale.
"""

from __future__ import annotations

import io
import os
import pickle
import shlex
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import Tensor, nn

from segcalib.errors import ConfigError
from segcalib.integrations.nnunet import trainer_folder
from segcalib.integrations.nnunet.loss_spec import (
    LOSS_ENV,
    TRAINER_LOSSES,
    LossSpec,
    describe,
    resolve_params,
    spec_from_env,
)
from segcalib.losses import AdaptiveLoss, CalibrationLoss, build_loss

EXT_TRAINER_ENV = "nnUNet_extTrainer"
CHECKPOINT_KEY = "segcalib_loss"
"""Key of nnU-Net's checkpoint dict holding ``{"name", "params", "state"}`` of the segcalib loss."""

__all__ = ["CHECKPOINT_KEY", "nnUNetTrainerSegcalib", *TRAINER_LOSSES]


def _full_resolution(x: Tensor | list | tuple) -> Tensor:
    """The highest-resolution entry of a deep-supervision list (the tensor itself without DS)."""
    return x[0] if isinstance(x, (list, tuple)) else x


class ValidationTap(nn.Module):
    """The trainer's loss for adaptive losses: computes ``loss(output, target)``; while
    ``active`` (nnU-Net's ``validation_step``), first hands the full-resolution output and target to
    ``adaptive.accumulate``, before nnU-Net overwrites ignored target voxels for its Dice."""

    def __init__(self, loss: nn.Module, adaptive: AdaptiveLoss) -> None:
        super().__init__()
        self.loss = loss
        self.adaptive = adaptive
        self.active = False

    def forward(self, output: Any, target: Any) -> Tensor:
        if self.active:
            self.adaptive.accumulate(_full_resolution(output).detach(), _full_resolution(target))
        return self.loss(output, target)


class nnUNetTrainerSegcalib(nnUNetTrainer):
    """nnU-Net's trainer with a segcalib loss: ``SEGCALIB_LOSS=name`` and ``SEGCALIB_LOSS_PARAMS``
    (JSON object) choose it; subclasses fix it with ``segcalib_loss_name``."""

    segcalib_loss_name: ClassVar[str | None] = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        spec = self.segcalib_loss_spec()
        labels = PlansManager(plans).get_label_manager(dataset_json)
        params = resolve_params(spec, labels.num_segmentation_heads, labels.ignore_label, labels.has_regions)
        try:
            loss = build_loss(spec.name, **params)
        except ConfigError as exc:
            raise ConfigError(f"{spec.source}: {exc}") from None
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.segcalib_spec = spec
        self.segcalib_params = params
        self.segcalib_loss: CalibrationLoss = loss.to(self.device)
        self.print_to_log_file(f"{describe(spec.name, params)} (from {spec.source})", also_print_to_console=True)
        self.print_to_log_file(
            f"segcalib: nnUNetv2_predict finds {type(self).__name__} only through {EXT_TRAINER_ENV}; "
            f"set it as for training: export {EXT_TRAINER_ENV}={shlex.quote(ext_trainer_value(type(self)))}",
            also_print_to_console=True,
        )
        if self.adaptive_loss is not None:
            self.print_to_log_file(
                f"segcalib: {spec.name}'s multipliers are updated after each epoch from that epoch's "
                "validation batches (full-resolution logits) and saved in the checkpoints"
            )

    @classmethod
    def segcalib_loss_spec(cls) -> LossSpec:
        """The loss this trainer trains with: the class's own, else from the environment."""
        if cls.segcalib_loss_name is not None:
            return LossSpec(cls.segcalib_loss_name, {}, source=cls.__name__)
        return spec_from_env()

    @property
    def adaptive_loss(self) -> AdaptiveLoss | None:
        return self.segcalib_loss if isinstance(self.segcalib_loss, AdaptiveLoss) else None

    def _build_loss(self) -> nn.Module:
        """nnU-Net's loss layout around the segcalib loss: nnU-Net builds its own (so the deep
        supervision wrapper and its weights are exactly nnU-Net's), then the segcalib loss takes
        the place of Dice + CE inside it."""
        nnunet_loss = super()._build_loss()
        if isinstance(nnunet_loss, DeepSupervisionWrapper):
            nnunet_loss.loss = self.segcalib_loss
            self.print_to_log_file(
                "segcalib: deep supervision weights per scale (nnU-Net's): "
                + ", ".join(f"{w:.4g}" for w in nnunet_loss.weight_factors)
            )
            loss: nn.Module = nnunet_loss
        else:
            loss = self.segcalib_loss
        if self.adaptive_loss is not None:
            loss = ValidationTap(loss, self.adaptive_loss)
        return loss

    def validation_step(self, batch: dict) -> dict:
        tap = self.loss if isinstance(self.loss, ValidationTap) else None
        if tap is None:
            return super().validation_step(batch)
        tap.active = True
        try:
            return super().validation_step(batch)
        finally:
            tap.active = False

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        super().on_validation_epoch_end(val_outputs)
        adaptive = self.adaptive_loss
        if adaptive is not None:
            adaptive.step()  # every rank: the sums are all-reduced inside
            state = ", ".join(f"{key}={value:.4g}" for key, value in adaptive.logged_state().items())
            self.print_to_log_file(f"segcalib {adaptive.name}: {state}")

    def segcalib_checkpoint(self) -> dict[str, Any]:
        """The loss's part of the checkpoint: name, parameters (JSON-like) and state tensors on the CPU."""
        state = {key: value.detach().cpu() for key, value in self.segcalib_loss.state_dict().items()}
        return {"name": self.segcalib_spec.name, "params": dict(self.segcalib_params), "state": state}

    def restore_segcalib_checkpoint(self, saved: dict[str, Any] | None, where: str) -> None:
        """Load the loss state saved by :meth:`segcalib_checkpoint`; refuses another loss's."""
        if saved is None:
            if self.adaptive_loss is not None:
                self.print_to_log_file(f"segcalib: {where} holds no segcalib loss state; "
                                       f"{self.segcalib_spec.name} starts from its initial multipliers")
            return
        if saved["name"] != self.segcalib_spec.name or saved["params"] != self.segcalib_params:
            raise ConfigError(
                f"{where}: trained with segcalib loss {saved['name']!r} {saved['params']}, but this trainer "
                f"uses {self.segcalib_spec.name!r} {self.segcalib_params} (from {self.segcalib_spec.source}); "
                f"set {LOSS_ENV} and its parameters as they were to continue"
            )
        self.segcalib_loss.load_state_dict(saved["state"])
        self.segcalib_loss.to(self.device)

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint with the loss state added: nnU-Net writes its dict to memory (so
        every key it saves, in any version, is kept), the loss's entry is added, then the file is written."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        buffer = io.BytesIO()
        super().save_checkpoint(buffer)  # type: ignore[arg-type]  # torch.save takes a file object
        buffer.seek(0)
        checkpoint = _load_plain(buffer, "the checkpoint nnU-Net just wrote")
        checkpoint[CHECKPOINT_KEY] = self.segcalib_checkpoint()
        torch.save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """nnU-Net's ``load_checkpoint`` (it reads the file itself), then the loss state."""
        super().load_checkpoint(filename_or_checkpoint)
        if isinstance(filename_or_checkpoint, dict):
            saved = filename_or_checkpoint.get(CHECKPOINT_KEY)
            where = "checkpoint"
        else:
            where = str(filename_or_checkpoint)
            saved = _read_segcalib_entry(where)
        self.restore_segcalib_checkpoint(saved, where)


def ext_trainer_value(cls: type, environ: Any = None) -> str:
    """The ``nnUNet_extTrainer`` value under which nnU-Net finds ``cls`` again (for prediction): the
    value set now when there is one (training found the class through it), else segcalib's trainer
    folder, plus the folder of ``cls``'s module when a user's subclass lives elsewhere."""
    environ = os.environ if environ is None else environ
    current = environ.get(EXT_TRAINER_ENV, "").strip()
    if current:
        return current
    folders = [str(trainer_folder())]
    module_file = getattr(sys.modules.get(cls.__module__), "__file__", None)
    if cls.__module__ != __name__ and module_file:
        folders.append(str(Path(module_file).resolve().parent))
    return os.pathsep.join(folders)


def _read_segcalib_entry(path: str) -> dict[str, Any] | None:
    """The ``"segcalib_loss"`` entry of an nnU-Net checkpoint file, read with ``weights_only=True``
    (nnU-Net's part of the file holds numpy scalars from its logging, allowed as plain data)."""
    return _load_plain(path, path).get(CHECKPOINT_KEY)


def _load_plain(source: Any, where: str) -> dict[str, Any]:
    """``torch.load(source, weights_only=True)`` with numpy's scalar types allowed; nothing read can
    run code. A checkpoint the safe loader refuses is an error naming it, never a second, unsafe read."""
    try:
        with torch.serialization.safe_globals(_numpy_data_types()):
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(f"{where}: holds objects that cannot be read safely (weights_only=True): {exc}") from None


def _numpy_data_types() -> list:
    """numpy's scalar constructor and dtype classes: what nnU-Net's logged numbers unpickle through."""
    core = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [core.multiarray.scalar, np.dtype, *dtypes]


def _named_trainer(class_name: str, loss_name: str) -> type[nnUNetTrainerSegcalib]:
    doc = f"nnU-Net's trainer with segcalib's ``{loss_name}`` loss (SPEC defaults), nnU-Net's deep supervision."
    return type(class_name, (nnUNetTrainerSegcalib,), {"segcalib_loss_name": loss_name, "__doc__": doc,
                                                       "__module__": __name__})


nnUNetTrainerSegcalibMbLS = _named_trainer("nnUNetTrainerSegcalibMbLS", TRAINER_LOSSES["nnUNetTrainerSegcalibMbLS"])
nnUNetTrainerSegcalibMbLSDice = _named_trainer("nnUNetTrainerSegcalibMbLSDice",
                                               TRAINER_LOSSES["nnUNetTrainerSegcalibMbLSDice"])
nnUNetTrainerSegcalibCALS = _named_trainer("nnUNetTrainerSegcalibCALS", TRAINER_LOSSES["nnUNetTrainerSegcalibCALS"])
nnUNetTrainerSegcalibCRaC = _named_trainer("nnUNetTrainerSegcalibCRaC", TRAINER_LOSSES["nnUNetTrainerSegcalibCRaC"])
nnUNetTrainerSegcalibNACL = _named_trainer("nnUNetTrainerSegcalibNACL", TRAINER_LOSSES["nnUNetTrainerSegcalibNACL"])
nnUNetTrainerSegcalibCE = _named_trainer("nnUNetTrainerSegcalibCE", TRAINER_LOSSES["nnUNetTrainerSegcalibCE"])
nnUNetTrainerSegcalibHardL1ACE = _named_trainer("nnUNetTrainerSegcalibHardL1ACE",
                                                TRAINER_LOSSES["nnUNetTrainerSegcalibHardL1ACE"])
nnUNetTrainerSegcalibSoftL1ACE = _named_trainer("nnUNetTrainerSegcalibSoftL1ACE",
                                                TRAINER_LOSSES["nnUNetTrainerSegcalibSoftL1ACE"])
nnUNetTrainerSegcalibHardL1ACEDiceCE = _named_trainer("nnUNetTrainerSegcalibHardL1ACEDiceCE",
                                                      TRAINER_LOSSES["nnUNetTrainerSegcalibHardL1ACEDiceCE"])
nnUNetTrainerSegcalibSoftL1ACEDiceCE = _named_trainer("nnUNetTrainerSegcalibSoftL1ACEDiceCE",
                                                      TRAINER_LOSSES["nnUNetTrainerSegcalibSoftL1ACEDiceCE"])
