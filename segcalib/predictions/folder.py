"""Find the prediction maps in a folder, whatever model wrote them, and read them one case at a time.

The formats are the registered :class:`~segcalib.predictions.formats.PredictionFormat` entries
(``segcalib`` export, ``nnunet`` ``--save_probabilities``, ``nifti`` 4D maps; see
:mod:`~segcalib.predictions.nifti_maps` and :mod:`~segcalib.predictions.nnunet_maps`);
``format="auto"`` asks each one's ``detect``. Where a case has both a logits and a probabilities
map, logits are read (no information lost to rounding), unless ``prefer="probs"`` (``evaluate``:
the probabilities are what was calibrated) or ``input="probs"``. Files that are not maps
(``.pkl``, ``plans.json``, an unreadable ``dataset.json``, 3D segmentations without an ``.npz``,
the companions ``_seg``, ``_variance`` ... of the map-folder layout) are ignored. Class counts come
from the headers (:meth:`PredictionFolder.class_count`), before any voxel is read.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

import segcalib.predictions.nifti_maps  # noqa: F401  (registers segcalib and nifti, in this order)
import segcalib.predictions.nnunet_maps  # noqa: F401  (registers nnunet)
from segcalib.errors import DataError
from segcalib.predictions.formats import PREDICTION_FORMATS, PredictionEntry, PredictionFormat, detect_format, expected_contents
from segcalib.predictions.layout import VALUE_MAPS
from segcalib.predictions.maps import PredictionMap, check_input, resolve_kind
from segcalib.predictions.readers import check_channel_axis, class_axis_hint

log = logging.getLogger("segcalib")

FORMATS = ("auto", *PREDICTION_FORMATS)
__all__ = ["FORMATS", "PredictionEntry", "PredictionFolder", "detect_format", "open_predictions"]


class PredictionFolder:
    """The maps of one folder; :meth:`read` loads one case (nothing is cached).

    In ``input="auto"`` mode every case must turn out the same kind: a folder whose first case
    reads as probabilities and a later one as logits is an error, not a silent mix.
    """

    def __init__(self, root: Path, format: PredictionFormat, entries: dict[str, PredictionEntry], channel_axis: str,
                 input: str, metadata: dict[str, Any]):
        self.root = root
        self.format = format.name
        self._format = format
        self.channel_axis = channel_axis
        self.input = input
        self.metadata = metadata
        self._entries = entries
        self._kind_seen: tuple[str, str] | None = None  # (kind, case_id) of the first case read
        self._renamed_warned = False

    def __repr__(self) -> str:
        return f"PredictionFolder({str(self.root)!r}, format={self.format!r}, cases={len(self._entries)})"

    def __len__(self) -> int:
        return len(self._entries)

    def case_ids(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, case_id: object) -> bool:
        return case_id in self._entries

    def entry(self, case_id: str) -> PredictionEntry:
        """The entry of ``case_id``; a :class:`DataError` naming the folder when there is none."""
        if case_id not in self._entries:
            found = ", ".join(self.case_ids()[:5]) + (" ..." if len(self) > 5 else "")
            raise DataError(f"case {case_id}: no prediction map in {self.root} ({self.format} folder with {len(self)} "
                            f"map(s): {found or 'none'})")
        return self._entries[case_id]

    def fold_of(self, case_id: str) -> str | None:
        """The nnU-Net fold (``fold_<k>``) whose validation holds ``case_id`` when this folder is a
        trainer folder read through its folds; None otherwise."""
        if "folds" not in self.metadata:
            return None
        return self.entry(case_id).path.parent.parent.name

    def path_of(self, case_id: str) -> tuple[Path, ...]:
        """The file(s) of ``case_id``: the map, then the geometry file when it is another one."""
        return self.entry(case_id).files

    def read(self, case_id: str) -> PredictionMap:
        """Load one case as a :class:`PredictionMap` (values float32 ``(C, *spatial)``;
        probabilities clipped to [0, 1], within the tolerance they were accepted with)."""
        entry = self.entry(case_id)
        values, header = self._format.read(entry, self.channel_axis)
        kind = resolve_kind(values, self.input, entry.hint, entry.path, case_id)
        if kind != entry.hint and entry.hint == "logits" and not self._renamed_warned:
            self._renamed_warned = True
            log.warning("%s: named as logits, but the values are probabilities (>= 0, summing to 1); read as "
                        "probabilities", entry.path)
        self._check_same_kind(kind, case_id)
        if kind == "probs":  # rounding (16-bit maps, float sums) may leave -1e-4: keep log(p) defined
            np.clip(values, 0.0, 1.0, out=values)
        return PredictionMap(values=values, kind=kind, affine=header.affine, source=entry.path,
                             geometry_file=header.path)

    def class_count(self, case_id: str, expected: int | None = None, by: str = "") -> int:
        """The number of classes of ``case_id``'s map, from the file's header alone; a DataError
        naming the file when it is not ``expected`` (``by``: who expects it), with a hint when the
        class axis looks wrong."""
        entry = self.entry(case_id)
        count, shape = self._format.class_count(entry, self.channel_axis)
        fixed = self._format.class_axis
        hint = "" if fixed is not None else class_axis_hint(shape, self.channel_axis, expected)
        if expected is not None and count != expected:
            who = f" by {by}" if by else ""
            raise DataError(f"{entry.path}: {count} classes (shape {shape}, class axis {fixed or self.channel_axis}), "
                            f"expected {expected}{who}{hint}")
        return count

    def expected_file(self, case_id: str) -> str:
        """The file name this folder's format would give ``case_id``'s map (missing-case messages)."""
        return self._format.expected_file(case_id)

    def _check_same_kind(self, kind: str, case_id: str) -> None:
        if self.input != "auto":
            return
        if self._kind_seen is None:
            self._kind_seen = (kind, case_id)
        elif self._kind_seen[0] != kind:
            first_kind, first_case = self._kind_seen
            raise DataError(f"{self.root}: case {case_id} reads as {kind} but case {first_case} as {first_kind}; "
                            "pass input=logits or input=probs")


def open_predictions(folder: str | Path, format: str = "auto", channel_axis: str = "last",
                     input: str = "auto", prefer: str | None = None) -> PredictionFolder:
    """List the maps of ``folder`` (no voxel data is read).

    Args:
        format: ``auto`` (from the folder's content) or a registered format (``segcalib``,
            ``nnunet``, ``nifti``: :data:`~segcalib.predictions.formats.PREDICTION_FORMATS`).
        channel_axis: class axis of NIfTI maps, ``last`` (segcalib, nnU-Net conventions) or ``first``.
        input: ``auto``, ``probs`` or ``logits``: what the values are (see
            :func:`segcalib.predictions.maps.resolve_kind`).
        prefer: ``probs`` or ``logits``: which map to read where a case has both (default: logits,
            unless ``input="probs"``).
    """
    root = Path(folder)
    if format != "auto":
        PREDICTION_FORMATS.check(format, "format")
    check_channel_axis(channel_axis)
    check_input(input)
    prefer = prefer or ("probs" if input == "probs" else "logits")
    if prefer not in VALUE_MAPS:
        raise ValueError(f"prefer: {prefer!r} is not one of {', '.join(VALUE_MAPS)}")
    if not root.is_dir():
        raise DataError(f"{root}: prediction folder does not exist" if not root.exists() else f"{root}: is not a folder")
    files = sorted(p for p in root.iterdir() if p.is_file())
    if format == "auto":
        format = detect_format(root, files)
    fmt = PREDICTION_FORMATS[format]
    entries, metadata = fmt.discover(root, files, prefer)
    if not entries:
        raise DataError(f"{root}: no {format} prediction maps found ({expected_contents(format)})")
    return PredictionFolder(root, fmt, entries, channel_axis, input, metadata)
