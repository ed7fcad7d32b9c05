"""A fitted calibrator on disk: ``calibrator.json`` (method, classes, parameters, extra facts) and,
only for methods with tensors, ``weights.safetensors``. Nothing read here can run code."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from segcalib.calibrators.base import Calibrator
from segcalib.calibrators.input_space import input_record, recorded_space
from segcalib.calibrators.registry import calibrator_class
from segcalib.errors import ConfigError, DataError
from segcalib.utils.files import write_text_atomic, write_with

CONFIG_NAME = "calibrator.json"
WEIGHTS_NAME = "weights.safetensors"
FORMAT_VERSION = 1
_RESERVED = ("format_version", "method", "classes", "params", "tensors", "input_space")


def save_calibrator(
    calibrator: Calibrator,
    folder: str | os.PathLike,
    extra: dict[str, Any] | None = None,
    *,
    fitted_on: str = "logits",
    source_format: str | None = None,
) -> Path:
    """Write ``calibrator`` (fitted) to ``folder``; ``extra`` (JSON-able, e.g. fit region, voxels used,
    cross-validation table) is stored beside the parameters at the top level. ``fitted_on`` says what
    the calibrator was fed: ``"logits"``, or ``"probs"`` for ``log max(p, 1e-12)`` of probability maps
    (read from a ``source_format`` folder); it is recorded as ``input_space`` (see
    :mod:`segcalib.calibrators.input_space`). Returns the JSON path."""
    from safetensors.torch import save_file

    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra keys {clash} are reserved in {CONFIG_NAME}")
    folder = Path(folder)
    tensors = {k: v.detach().cpu().contiguous() for k, v in calibrator.tensors().items()}
    document = {
        "format_version": FORMAT_VERSION,
        "method": calibrator.name,
        "classes": calibrator.num_classes,
        "params": calibrator.get_params(),
        "tensors": sorted(tensors),
        "input_space": input_record(fitted_on, source_format),
        **extra,
    }
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    weights = folder / WEIGHTS_NAME
    if tensors:
        write_with(weights, lambda tmp: save_file(tensors, str(tmp)))
    else:
        weights.unlink(missing_ok=True)  # a stale file from an earlier method must not be read as this one's
    path = folder / CONFIG_NAME
    write_text_atomic(path, text)
    return path


def read_calibrator_json(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked contents of ``folder/calibrator.json`` (DataError naming the file otherwise)."""
    path = Path(folder) / CONFIG_NAME
    try:
        document = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except FileNotFoundError:
        raise DataError(f"{path}: no calibrator here (missing {CONFIG_NAME})") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not a readable calibrator file ({exc})") from None
    if not isinstance(document, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(document).__name__}")
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    classes = document.get("classes")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise DataError(f"{path}: 'classes' must be an integer >= 2, got {classes!r}")
    if not isinstance(document.get("method"), str):
        raise DataError(f"{path}: 'method' must be a calibrator name, got {document.get('method')!r}")
    if not isinstance(document.get("params"), dict):
        raise DataError(f"{path}: 'params' must be an object, got {document.get('params')!r}")
    names = document.get("tensors", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: 'tensors' must be a list of names, got {names!r}")
    recorded_space(document, str(path))  # a malformed input_space is refused here
    return document


def load_calibrator(folder: str | os.PathLike) -> Calibrator:
    """The fitted calibrator saved in ``folder`` by :func:`save_calibrator`.

    Raises:
        DataError: missing or malformed ``calibrator.json`` / ``weights.safetensors`` (names the file).
    """
    document = read_calibrator_json(folder)
    path = Path(folder) / CONFIG_NAME
    try:
        cls = calibrator_class(document["method"])
    except ConfigError as exc:
        raise DataError(f"{path}: {exc}") from None
    tensors = _read_tensors(Path(folder) / WEIGHTS_NAME, document["tensors"])
    try:
        calibrator = cls.from_params(document["classes"], document["params"], tensors)
    except (DataError, ConfigError) as exc:
        raise DataError(f"{path}: {exc}") from None
    calibrator.input_space = recorded_space(document, str(path))
    return calibrator


def _read_tensors(path: Path, names: list[str]) -> dict:
    if not names:
        return {}
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: missing; {CONFIG_NAME} lists tensors {names}") from None
    except (OSError, SafetensorError, ValueError) as exc:
        raise DataError(f"{path}: not a readable safetensors file ({exc})") from None
    if sorted(tensors) != sorted(names):
        raise DataError(f"{path}: holds tensors {sorted(tensors)}, {CONFIG_NAME} lists {sorted(names)}")
    return tensors


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid number")

