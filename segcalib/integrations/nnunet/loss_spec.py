"""Which segcalib loss an nnU-Net trainer uses, and its parameters, checked before any work.

Named trainers fix the loss (:data:`TRAINER_LOSSES`, SPEC defaults); the generic
``nnUNetTrainerSegcalib`` reads it from the environment: ``SEGCALIB_LOSS=mbls`` and, optionally,
``SEGCALIB_LOSS_PARAMS='{"margin": 5}'`` (a JSON object with the loss's parameters, the keys of
segcalib configs' ``loss`` section). ``num_classes`` and ``ignore_index`` follow from nnU-Net's
``dataset.json`` labels and are refused there. No nnunetv2 import: testable without it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from segcalib.errors import ConfigError
from segcalib.losses import check_loss_params, loss_parameters

LOSS_ENV = "SEGCALIB_LOSS"
PARAMS_ENV = "SEGCALIB_LOSS_PARAMS"

TRAINER_LOSSES: dict[str, str] = {
    "nnUNetTrainerSegcalibMbLS": "mbls",
    "nnUNetTrainerSegcalibMbLSDice": "mbls_dice",
    "nnUNetTrainerSegcalibCALS": "cals",
    "nnUNetTrainerSegcalibCRaC": "crac",
    "nnUNetTrainerSegcalibNACL": "nacl",
    "nnUNetTrainerSegcalibCE": "ce",
    "nnUNetTrainerSegcalibHardL1ACE": "hardl1ace",
    "nnUNetTrainerSegcalibSoftL1ACE": "softl1ace",
    "nnUNetTrainerSegcalibHardL1ACEDiceCE": "hardl1ace_dice_ce",
    "nnUNetTrainerSegcalibSoftL1ACEDiceCE": "softl1ace_dice_ce",
}
"""Trainer class name -> the segcalib loss it trains with (SPEC defaults)."""

DATA_PARAMS = ("num_classes", "ignore_index")
"""Loss parameters that nnU-Net's dataset.json decides (labels, ``ignore`` label)."""


@dataclass(frozen=True)
class LossSpec:
    """A loss name, the parameters the user set, and where they came from (for messages)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    source: str = "trainer"


def spec_from_env(environ: Mapping[str, str] | None = None) -> LossSpec:
    """``SEGCALIB_LOSS`` / ``SEGCALIB_LOSS_PARAMS`` as a :class:`LossSpec`; ConfigError naming the variable."""
    environ = os.environ if environ is None else environ
    name = environ.get(LOSS_ENV, "").strip()
    if not name:
        raise ConfigError(
            f"{LOSS_ENV}: not set; nnUNetTrainerSegcalib needs the loss name, e.g. export {LOSS_ENV}=mbls "
            f"(and optionally {PARAMS_ENV}='{{\"margin\": 10}}'), or use a named trainer: {', '.join(TRAINER_LOSSES)}"
        )
    text = environ.get(PARAMS_ENV, "").strip()
    try:
        params = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{PARAMS_ENV}: not valid JSON ({exc.msg} at character {exc.pos}): {text!r}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{PARAMS_ENV}: must be a JSON object of loss parameters, got {type(params).__name__}: {text!r}")
    return LossSpec(name, params, source=f"{LOSS_ENV}/{PARAMS_ENV}")


def resolve_params(spec: LossSpec, num_classes: int, ignore_label: int | None, has_regions: bool) -> dict[str, Any]:
    """The full keyword parameters of ``build_loss(spec.name, ...)`` for an nnU-Net dataset.

    ``num_classes`` = nnU-Net's segmentation heads (the ignore label excluded); ``ignore_index`` =
    the dataset's ignore label (nnU-Net's ``label_manager.ignore_label``) when it has one.

    Raises:
        ConfigError: unknown loss or parameter (the message names the variable and the key), a
            data-given parameter set by hand, or region-based labels (segcalib's losses are
            softmax losses over exclusive classes; nnU-Net trains regions with sigmoid outputs).
    """
    try:
        check_loss_params(spec.name, spec.params, allow_missing=True)
    except ConfigError as exc:
        raise ConfigError(f"{spec.source}: {exc}") from None
    for key in DATA_PARAMS:
        if key in spec.params:
            raise ConfigError(
                f"{spec.source}: loss.{key}: follows from nnU-Net's dataset.json labels "
                f"(classes and the 'ignore' label); remove {key!r} from {PARAMS_ENV}"
            )
    if has_regions:
        raise ConfigError(
            f"dataset.json: region-based labels (tuples of labels, 'regions_class_order') train sigmoid "
            f"outputs, one per overlapping region; segcalib loss {spec.name!r} is a softmax loss over "
            "exclusive classes and cannot train them. Use plain integer labels, or nnU-Net's own trainer"
        )
    valid = loss_parameters(spec.name)
    params = dict(spec.params)
    if "num_classes" in valid:
        params["num_classes"] = int(num_classes)
    if ignore_label is not None:
        params["ignore_index"] = int(ignore_label)
    return params


def describe(name: str, params: Mapping[str, Any]) -> str:
    """One line for nnU-Net's training log: the loss and every parameter it runs with (defaults included)."""
    full = {key: value for key, value in loss_parameters(name).items()}
    full.update(params)
    return f"segcalib loss {name!r} with " + ", ".join(f"{key}={value!r}" for key, value in full.items())
