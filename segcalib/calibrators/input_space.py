"""The input space of a fitted calibrator, and the exact conversions into it.

A calibrator is a function of the tensor it was fitted on. Fitted on logits (a segcalib export's
``_logits`` maps, a model's output), it takes logits ``z``; fitted on probability maps (nnU-Net's
``.npz``, ``_probs`` maps), it takes log-probabilities ``log max(p, PROB_FLOOR)``. ``calibrator.json``
records which (``input_space``), and every place that feeds a calibrator converts what it has into
that space first:

| calibrator fitted on | given logits                                   | given probabilities          |
|---|---|---|
| ``logits``           | as they are                                    | refused: logits are lost     |
| ``log_probs``        | ``max(log_softmax(z), log PROB_FLOOR)`` (exact) | ``log max(p, PROB_FLOOR)``   |

Probabilities cannot be turned back into the logits (only up to a per-voxel constant, and not
where ``p`` is below the floor), so a logits calibrator never meets probabilities: that is a
:class:`~segcalib.errors.DataError` naming both spaces. ``log_softmax`` subtracts the maximum, so
the conversion is finite for every finite input.

Files written before the space was recorded have no ``input_space``: those fitted on an nnU-Net
folder held probabilities (``log_probs``); for the others the space is unknown and the maps are
fed as they come (the earlier behaviour), with a warning to refit.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from segcalib.errors import DataError

log = logging.getLogger("segcalib")

LOGITS, LOG_PROBS = "logits", "log_probs"
SPACES = (LOGITS, LOG_PROBS)
PROB_FLOOR = 1e-12  # probabilities enter a calibrator as log(max(p, floor)): softmax(log p) = p
_LOG_FLOOR = math.log(PROB_FLOOR)
_SPACE_OF_KIND = {"logits": LOGITS, "probs": LOG_PROBS}
_WORDS = {LOGITS: "logits", LOG_PROBS: "log-probabilities (fitted on probability maps)", None: "unrecorded"}


def space_of_kind(kind: str) -> str:
    """The space a calibrator fitted on maps of ``kind`` (``"logits"`` / ``"probs"``) works in."""
    try:
        return _SPACE_OF_KIND[kind]
    except KeyError:
        raise ValueError(f"map kind {kind!r} is not one of {', '.join(_SPACE_OF_KIND)}") from None


def input_record(kind: str, source_format: str | None) -> dict[str, Any]:
    """The ``input_space`` entry of ``calibrator.json`` for a fit on maps of ``kind``."""
    return {"space": space_of_kind(kind), "fitted_on": kind, "source_format": source_format, "prob_floor": PROB_FLOOR}


def recorded_space(document: dict[str, Any], where: str = "calibrator.json") -> str | None:
    """The space recorded in a ``calibrator.json`` document (None: unknown, written before it was
    recorded). A malformed entry is a DataError naming ``where``."""
    entry = document.get("input_space")
    if entry is None:
        return LOG_PROBS if document.get("prediction_format") == "nnunet" else None  # nnU-Net maps are probabilities
    space = entry.get("space") if isinstance(entry, dict) else None
    if space not in SPACES:
        raise DataError(f"{where}: 'input_space' must be an object with 'space' one of {', '.join(SPACES)}, "
                        f"got {entry!r}")
    return space


def check_convertible(space: str | None, kind: str, where: str, case: str | None = None) -> None:
    """DataError when maps of ``kind`` cannot be turned exactly into ``space`` (probabilities for a
    logits calibrator); ``where`` names the calibrator, ``case`` the map."""
    if space == LOGITS and kind == "probs":
        what = f"case {case}: " if case else ""
        raise DataError(
            f"{what}the maps are probabilities, but the calibrator {where} was fitted on logits: probabilities "
            "cannot be turned back into logits exactly; give its logits (segcalib export --logits), or fit the "
            "calibrator on probability maps (input space: log-probabilities)"
        )


def to_space(values: Tensor, kind: str, space: str | None, dim: int = 1) -> Tensor:
    """``values`` (logits or probabilities, per ``kind``) in the calibrator's ``space``, float32.

    ``space=None`` (a file without the record) feeds logits as they are and probabilities as
    ``log max(p, floor)``, as segcalib did before the space was recorded. May work in place on
    ``values`` when it is float32 already, as the callers own it.
    """
    check_convertible(space, kind, "given")
    values = values.float()
    if kind == "probs":
        return values.clamp_min_(PROB_FLOOR).log_()
    if space == LOG_PROBS:
        return torch.log_softmax(values, dim=dim).clamp_min_(_LOG_FLOOR)
    return values


def describe(space: str | None) -> str:
    """Words for a space, for messages."""
    return _WORDS.get(space, str(space))


def warn_unrecorded(where: str) -> None:
    log.warning("%s: calibrator.json does not record the input space it was fitted on (written before segcalib "
                "recorded it); the maps are fed as they come. Refit it to have the space checked and converted.",
                where)
