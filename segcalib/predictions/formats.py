"""Prediction formats by name: each a :class:`PredictionFormat` that owns its folder's discovery
(which files are which case's map), its detection and its reader.

Registered in :data:`PREDICTION_FORMATS` (a :class:`~segcalib.utils.names.Registry`); ``format="auto"``
asks each format's ``detect`` in registration order. Adding a format is one module of this package
that calls :func:`register_format`, imported by :mod:`segcalib.predictions.folder`; the CLI's
``--format`` choices and the shared contract test (``tests/predictions/test_format_contract.py``)
read the registry.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segcalib.data.volumes import VolumeHeader
from segcalib.errors import DataError
from segcalib.utils.names import Registry

log = logging.getLogger("segcalib")


@dataclass(frozen=True)
class PredictionEntry:
    """Where one case's map is: ``path`` holds the values, ``geometry`` the header that places
    them (``None``: nnU-Net's segmentation is missing); ``hint`` is what the name declares
    (``"probs"``, ``"logits"`` or None)."""

    case_id: str
    path: Path
    geometry: Path | None
    hint: str | None

    @property
    def files(self) -> tuple[Path, ...]:
        extra = () if self.geometry in (None, self.path) else (self.geometry,)
        return (self.path,) + extra


Entries = dict[str, PredictionEntry]


@dataclass(frozen=True)
class PredictionFormat:
    """One prediction format.

    Attributes:
        name: the ``--format`` value.
        holds: what its folder holds, in words (messages, ``--help``).
        detect: ``(folder, its files) -> bool``: is this folder of this format (``format="auto"``)?
        discover: ``(folder, its files, prefer) -> (entries by case id, metadata)``; ``prefer``
            (``"logits"`` / ``"probs"``) chooses where a case has both. Raises a DataError naming
            the files when they clash (two maps of one case, another format mixed in).
        read: ``(entry, channel_axis) -> (values (C, *spatial) float32, header of the geometry file)``.
        class_count: ``(entry, channel_axis) -> (classes, shape of the stored array)``, from headers only.
        expected_file: ``case_id -> `` the file name a case's map would have (missing-case messages).
        class_axis: where the class axis is when the format fixes it (``"first"``); None: the
            ``channel_axis`` option says.
    """

    name: str
    holds: str
    detect: Callable[[Path, list[Path]], bool]
    discover: Callable[[Path, list[Path], str], tuple[Entries, dict[str, Any]]]
    read: Callable[[PredictionEntry, str], tuple[np.ndarray, VolumeHeader]]
    class_count: Callable[[PredictionEntry, str], tuple[int, tuple[int, ...]]]
    expected_file: Callable[[str], str]
    class_axis: str | None = None


PREDICTION_FORMATS: Registry[PredictionFormat] = Registry("prediction format")


def register_format(fmt: PredictionFormat) -> PredictionFormat:
    """Add ``fmt`` under its name (twice is a programming error)."""
    return PREDICTION_FORMATS.register(fmt.name, fmt)


def detect_format(root: Path, files: list[Path]) -> str:
    """The first registered format whose ``detect`` accepts ``root``; a DataError listing what
    each format expects otherwise."""
    for name, fmt in PREDICTION_FORMATS.items():
        if fmt.detect(root, files):
            return name
    raise DataError(f"{root}: no prediction maps found (expected {expected_contents()})")


def expected_contents(name: str | None = None) -> str:
    """What a folder of format ``name`` holds (every format's, joined by "or", for None)."""
    if name is not None and name in PREDICTION_FORMATS:
        return PREDICTION_FORMATS[name].holds
    return "; or ".join(f"{fmt.holds} ({key})" for key, fmt in PREDICTION_FORMATS.items())


def add_entry(entries: Entries, entry: PredictionEntry) -> None:
    """Add ``entry``; a DataError naming both files when its case id is taken."""
    if entry.case_id in entries:
        other = entries[entry.case_id]
        raise DataError(f"case {entry.case_id}: {other.path} and {entry.path} give the same case id; rename one")
    entries[entry.case_id] = entry


def shown(paths: list[str], limit: int = 3) -> str:
    """The first ``limit`` of ``paths`` and how many more."""
    return ", ".join(paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def read_json(path: Path) -> dict[str, Any]:
    """``path``'s JSON object; a DataError naming the file otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object")
    return value


def optional_json(path: Path) -> dict[str, Any]:
    """``path``'s JSON object, or ``{}`` when it is missing or unreadable (it is not needed)."""
    if not path.is_file():
        return {}
    try:
        return read_json(path)
    except DataError as exc:
        log.info("%s (ignored: nothing here needs it)", exc)
        return {}
