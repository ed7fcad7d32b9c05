"""Find the prediction maps in a folder, whatever model wrote them, and read them one case at a time.

Formats (``format="auto"`` tells them apart by content, in this order):

- ``segcalib``: a ``segcalib export`` folder (``export.json`` present): ``<case>_probs.nii.gz``
  (4D, class last, float32 or uint16 with ``scl_slope``) and/or ``<case>_logits.nii.gz``; the
  ``_seg`` / ``_uncertainty`` / ``_entropy`` ... files beside them are not maps.
- ``nnunet``: an nnU-Net v2 prediction folder written with ``--save_probabilities`` (``.npz``
  files present): ``<case>.npz`` (``probabilities``, ``(C, z, y, x)``) beside the segmentation
  ``<case>.nii.gz`` (or ``.nii``, ``.mha``, ``.nrrd``) whose header gives the geometry. The
  ``.pkl`` files nnU-Net writes beside them are never opened. A trainer output folder
  (``nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>``, no maps of its own) is read as the
  union of its ``fold_<k>/validation`` folders: the out-of-fold maps of every training case that
  ``nnUNetv2_train ... --npz`` keeps, what a calibrator should be fitted on.
- ``nifti``: any folder of NIfTI maps ``<case>.nii``, ``<case>.nii.gz``, ``<case>_probs.nii.gz``
  or ``<case>_logits.nii.gz``, class on the last axis (``channel_axis="first"`` for the other
  layout).

Case ids are the file names without suffix and without ``_probs`` / ``_logits``, made file-name
safe as manifest ids are (:func:`segcalib.data.safe_case_id`). Where a case has both a logits
and a probabilities map, logits are read (no information lost to rounding), unless
``input="probs"``. Two files for one case in the same role (``a.nii`` and ``a.nii.gz``), an
``.npz`` and a NIfTI map of one case, and folders that mix nnU-Net ``.npz`` maps with NIfTI maps
are errors that name the files; files that are not maps (``.pkl``, ``plans.json``, an unreadable
``dataset.json``, 3D segmentations without an ``.npz``) are ignored. Class counts come from the
headers (:meth:`PredictionFolder.class_count`), before any voxel is read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segcalib.data.manifest import safe_case_id
from segcalib.data.volumes import read_header
from segcalib.errors import DataError
from segcalib.predictions.maps import PredictionMap, check_input, resolve_kind
from segcalib.predictions.readers import (
    check_channel_axis,
    class_axis_hint,
    nifti_class_count,
    nnunet_class_count,
    read_nifti_map,
    read_nnunet_map,
)

from segcalib.utils.names import Registry

log = logging.getLogger("segcalib")

PREDICTION_FORMATS: Registry[str] = Registry("prediction format")  # name -> what its folder holds
PREDICTION_FORMATS.register("segcalib", "<case>_probs.nii.gz or <case>_logits.nii.gz beside export.json")
PREDICTION_FORMATS.register("nnunet", "<case>.npz from nnUNetv2_predict --save_probabilities, beside <case>.nii.gz")
PREDICTION_FORMATS.register("nifti", "<case>.nii, <case>.nii.gz, <case>_probs.nii.gz or <case>_logits.nii.gz")
FORMATS = ("auto", *PREDICTION_FORMATS)
EXPORT_JSON = "export.json"  # segcalib.export.exporter.EXPORT_JSON (not imported: export needs torch)
NIFTI_ENDINGS = (".nii.gz", ".nii")
NNUNET_SEG_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")
ROLE_SUFFIXES = {"_probs": "probs", "_logits": "logits"}
COMPANION_SUFFIXES = ("_seg", "_uncertainty", "_entropy", "_mutual_info", "_expected_entropy")


@dataclass(frozen=True)
class PredictionEntry:
    """Where one case's map is: ``path`` holds the values, ``geometry`` the header that places
    them (``None``: nnU-Net's segmentation is missing); ``hint`` is what the name declares."""

    case_id: str
    path: Path
    geometry: Path | None
    hint: str | None

    @property
    def files(self) -> tuple[Path, ...]:
        extra = () if self.geometry in (None, self.path) else (self.geometry,)
        return (self.path,) + extra


class PredictionFolder:
    """The maps of one folder; :meth:`read` loads one case (nothing is cached).

    In ``input="auto"`` mode every case must turn out the same kind: a folder whose first case
    reads as probabilities and a later one as logits is an error, not a silent mix.
    """

    def __init__(self, root: Path, format: str, entries: dict[str, PredictionEntry], channel_axis: str,
                 input: str, metadata: dict[str, Any]):
        self.root = root
        self.format = format
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
        if self.format == "nnunet":
            if entry.geometry is None:
                raise DataError(f"{entry.path}: no segmentation {case_id}{{{','.join(NNUNET_SEG_ENDINGS)}}} beside it "
                                "(nnU-Net writes one per case; it gives the geometry)")
            values, header = read_nnunet_map(entry.path, entry.geometry)
        else:
            values, header = read_nifti_map(entry.path, self.channel_axis)
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
        if self.format == "nnunet":
            count, shape = nnunet_class_count(entry.path)
            hint = ""
        else:
            count, shape = nifti_class_count(entry.path, self.channel_axis)
            hint = class_axis_hint(shape, self.channel_axis, expected)
        if expected is not None and count != expected:
            axis = "first" if self.format == "nnunet" else self.channel_axis
            who = f" by {by}" if by else ""
            raise DataError(f"{entry.path}: {count} classes (shape {shape}, class axis {axis}), expected {expected}{who}"
                            f"{hint}")
        return count

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
                     input: str = "auto") -> PredictionFolder:
    """List the maps of ``folder`` (no voxel data is read).

    Args:
        format: ``auto`` (from the folder's content), ``segcalib``, ``nnunet`` or ``nifti``.
        channel_axis: class axis of NIfTI maps, ``last`` (segcalib, nnU-Net conventions) or ``first``.
        input: ``auto``, ``probs`` or ``logits``: what the values are (see
            :func:`segcalib.predictions.maps.resolve_kind`).
    """
    root = Path(folder)
    if format != "auto":
        PREDICTION_FORMATS.check(format, "format")
    check_channel_axis(channel_axis)
    check_input(input)
    if not root.is_dir():
        raise DataError(f"{root}: prediction folder does not exist" if not root.exists() else f"{root}: is not a folder")
    files = sorted(p for p in root.iterdir() if p.is_file())
    folds = cross_validation_folders(root) if format in ("auto", "nnunet") else []
    if folds and not any(_is_map_file(p) for p in files):
        return PredictionFolder(root, "nnunet", _fold_entries(folds), channel_axis, input,
                                {**_optional_json(root / "dataset.json"), "folds": [str(f) for f in folds]})
    if format == "auto":
        format = detect_format(root, files)
    if format == "nnunet":
        entries = _nnunet_entries(root, files)
        metadata = _optional_json(root / "dataset.json")  # informative only: a bad one is no obstacle
    else:
        _refuse_npz(root, files, format)
        entries = _nifti_entries(root, files, input, only_named=format == "segcalib")
        metadata = _read_json(root / EXPORT_JSON) if format == "segcalib" and (root / EXPORT_JSON).is_file() else {}
    if not entries:
        raise DataError(f"{root}: no {format} prediction maps found ({_expected(format)})")
    return PredictionFolder(root, format, entries, channel_axis, input, metadata)


def detect_format(root: Path, files: list[Path]) -> str:
    """``segcalib`` (export.json), ``nnunet`` (.npz files) or ``nifti`` (.nii / .nii.gz files)."""
    names = {p.name for p in files}
    if EXPORT_JSON in names:
        return "segcalib"
    if any(name.endswith(".npz") for name in names):
        return "nnunet"
    if any(name.lower().endswith(NIFTI_ENDINGS) for name in names):
        return "nifti"
    raise DataError(f"{root}: no prediction maps found (expected {_expected('auto')})")


# -- discovery ---------------------------------------------------------------------------------


def cross_validation_folders(root: Path) -> list[Path]:
    """``fold_<k>/validation`` folders of an nnU-Net trainer output folder
    (``nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>``), in fold order; ``fold_all``
    (trained on every case, so with no held-out case) is not one of them."""
    folds = [p / "validation" for p in root.glob("fold_*") if p.name[5:].isdigit() and (p / "validation").is_dir()]
    return sorted(folds, key=lambda p: int(p.parent.name[5:]))


def _fold_entries(folds: list[Path]) -> dict[str, PredictionEntry]:
    """Every fold's held-out maps as one folder: each training case is in exactly one fold's
    validation (a case in two folds is an error naming both files)."""
    entries: dict[str, PredictionEntry] = {}
    for folder in folds:
        files = sorted(p for p in folder.iterdir() if p.is_file())
        if not any(p.name.endswith(".npz") for p in files):
            raise DataError(f"{folder}: no .npz probability maps; nnU-Net writes the validation probabilities only when "
                            "trained with --npz (or rerun: nnUNetv2_train DATASET CONFIG FOLD --val --npz)")
        for entry in _nnunet_entries(folder, files).values():
            _add(entries, entry)
    return entries


def _is_map_file(path: Path) -> bool:
    return path.name.endswith(".npz") or path.name.lower().endswith(NIFTI_ENDINGS)


def _nnunet_entries(root: Path, files: list[Path]) -> dict[str, PredictionEntry]:
    by_name = {p.name: p for p in files}
    entries: dict[str, PredictionEntry] = {}
    npz_stems = {p.name[: -len(".npz")]: p for p in files if p.name.endswith(".npz")}
    for stem, path in npz_stems.items():
        segs = [by_name[stem + e] for e in NNUNET_SEG_ENDINGS if stem + e in by_name]
        if len(segs) > 1:
            raise DataError(f"{path}: several segmentations beside it ({', '.join(str(s) for s in segs)}); keep one")
        if segs and _is_nifti_map(segs[0]):
            raise DataError(f"case {safe_case_id(stem)}: two maps in {root}, {path} and the 4D {segs[0]} (where "
                            "nnU-Net keeps the segmentation); keep one")
        _add(entries, PredictionEntry(safe_case_id(stem), path, segs[0] if segs else None, "probs"))
    if npz_stems:
        _refuse_nifti_maps(root, files, npz_stems)
    return entries


def _refuse_nifti_maps(root: Path, files: list[Path], npz_stems: dict[str, Path]) -> None:
    """NIfTI maps in an nnU-Net folder: a second map of a case (an error naming both) or maps of
    another format mixed in (an error naming them). 3D files without an ``.npz`` are not maps."""
    strays = []
    for path in files:
        ending = next((e for e in NIFTI_ENDINGS if path.name.lower().endswith(e)), None)
        if ending is None:
            continue
        stem = path.name[: -len(ending)]
        base, role = _split_role(stem)
        if role is not None and base in npz_stems:
            raise DataError(f"case {safe_case_id(base)}: two maps in {root}, {npz_stems[base]} and {path}; keep one")
        if stem not in npz_stems and (role is not None or _is_nifti_map(path, unreadable=False)):
            strays.append(str(path))
    if strays:
        shown = ", ".join(strays[:3]) + (f" and {len(strays) - 3} more" if len(strays) > 3 else "")
        raise DataError(f"{root}: mixes nnU-Net .npz maps with NIfTI maps ({shown}); keep one format per folder "
                        "(every case would otherwise be read from the .npz files only)")


def _refuse_npz(root: Path, files: list[Path], format: str) -> None:
    npz = [str(p) for p in files if p.name.endswith(".npz")]
    if npz:
        shown = ", ".join(npz[:3]) + (f" and {len(npz) - 3} more" if len(npz) > 3 else "")
        raise DataError(f"{root}: a {format} folder that also holds nnU-Net .npz maps ({shown}); keep one format per "
                        "folder")


def _is_nifti_map(path: Path, unreadable: bool | None = None) -> bool:
    """A NIfTI file with a class axis (4D, more than one entry on the last axis); an unreadable
    file is ``unreadable`` (None: its DataError is raised)."""
    if not path.name.lower().endswith(NIFTI_ENDINGS):
        return False
    try:
        shape = read_header(path).shape
    except DataError:
        if unreadable is None:
            raise
        return unreadable
    return len(shape) >= 4 and shape[-1] > 1


def _nifti_entries(root: Path, files: list[Path], input: str, only_named: bool) -> dict[str, PredictionEntry]:
    """Entries of a NIfTI folder; ``only_named``: only ``_probs`` / ``_logits`` files (segcalib export)."""
    candidates: dict[str, dict[str | None, list[Path]]] = {}
    stems: dict[Path, str] = {}
    for path in files:
        ending = next((e for e in NIFTI_ENDINGS if path.name.lower().endswith(e)), None)
        if ending is not None:
            stems[path] = path.name[: -len(ending)]
    named = {_split_role(s)[0] for s in stems.values() if _split_role(s)[1] is not None}
    for path, stem in stems.items():
        base, role = _split_role(stem)
        if role is None and (only_named or _is_companion(stem, named)):
            continue
        candidates.setdefault(safe_case_id(base), {}).setdefault(role, []).append(path)
    preference = ("probs", "logits") if input == "probs" else ("logits", "probs")
    entries: dict[str, PredictionEntry] = {}
    for case_id, roles in candidates.items():
        if None in roles and len(roles) > 1:
            clash = sorted(str(p) for paths in roles.values() for p in paths)
            raise DataError(f"case {case_id}: several maps in {root} ({', '.join(clash)}); keep one")
        role = next((r for r in preference if r in roles), None)
        paths = roles[role]
        if len(paths) > 1:
            raise DataError(f"case {case_id}: several maps in {root} ({', '.join(str(p) for p in sorted(paths))}); keep one")
        _add(entries, PredictionEntry(case_id, paths[0], paths[0], role))
    return entries


def _split_role(stem: str) -> tuple[str, str | None]:
    for suffix, role in ROLE_SUFFIXES.items():
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)], role
    return stem, None


def _is_companion(stem: str, named: set[str]) -> bool:
    """``<case>_seg`` and the like, beside a ``<case>_probs`` / ``_logits`` map, are not maps."""
    return any(stem.endswith(s) and stem[: -len(s)] in named for s in COMPANION_SUFFIXES)


def _add(entries: dict[str, PredictionEntry], entry: PredictionEntry) -> None:
    if entry.case_id in entries:
        other = entries[entry.case_id]
        raise DataError(f"case {entry.case_id}: {other.path} and {entry.path} give the same case id; rename one")
    entries[entry.case_id] = entry


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object")
    return value


def _optional_json(path: Path) -> dict[str, Any]:
    """``path``'s JSON object, or ``{}`` when it is missing or unreadable (it is not needed)."""
    if not path.is_file():
        return {}
    try:
        return _read_json(path)
    except DataError as exc:
        log.info("%s (ignored: nothing here needs it)", exc)
        return {}


def _expected(format: str) -> str:
    return PREDICTION_FORMATS.get(format, "segcalib export, nnU-Net --save_probabilities .npz, or 4D NIfTI maps")
