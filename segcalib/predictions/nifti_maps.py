"""The NIfTI prediction formats: ``segcalib`` (an export folder) and ``nifti`` (any 4D NIfTI maps).

- ``segcalib``: ``export.json`` present; the maps are ``<case>_probs.nii.gz`` and/or
  ``<case>_logits.nii.gz`` (:mod:`segcalib.predictions.layout`), class last; the companions
  beside them (``_seg``, ``_uncertainty``, ``_variance`` ...) are not maps.
- ``nifti``: ``<case>.nii``, ``<case>.nii.gz``, ``<case>_probs.nii.gz`` or ``<case>_logits.nii.gz``,
  class on the last axis (``channel_axis="first"`` for the other layout); a companion file of the
  layout beside a ``_probs`` / ``_logits`` map of the same case is not a case of its own.

Case ids are the file names without ending and map name, made file-name safe as manifest ids are
(:func:`segcalib.data.safe_case_id`). A folder holding nnU-Net ``.npz`` maps is refused (one
format per folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segcalib.data.manifest import safe_case_id
from segcalib.errors import DataError
from segcalib.predictions.formats import (
    Entries,
    PredictionEntry,
    PredictionFormat,
    add_entry,
    read_json,
    register_format,
    shown,
)
from segcalib.predictions.layout import EXPORT_JSON, MAP_ENDING, VALUE_MAPS, map_path, split_map_name
from segcalib.predictions.readers import nifti_class_count, read_nifti_map

NIFTI_ENDINGS = (".nii.gz", ".nii")


def nifti_ending(path: Path) -> str | None:
    """``.nii.gz`` / ``.nii`` (any case) when ``path`` is a NIfTI file, else None."""
    return next((e for e in NIFTI_ENDINGS if path.name.lower().endswith(e)), None)


def split_role(stem: str) -> tuple[str, str | None]:
    """``(case stem, "probs" | "logits")`` for a value map's stem, ``(stem, None)`` otherwise."""
    base, name = split_map_name(stem)
    return (base, name) if name in VALUE_MAPS else (stem, None)


def nifti_entries(root: Path, files: list[Path], prefer: str, only_named: bool) -> Entries:
    """Entries of a NIfTI folder; ``only_named``: only ``_probs`` / ``_logits`` files (segcalib export)."""
    stems = {p: p.name[: -len(e)] for p in files if (e := nifti_ending(p)) is not None}
    named = {base for base, role in map(split_role, stems.values()) if role is not None}
    candidates: dict[str, dict[str | None, list[Path]]] = {}
    for path, stem in stems.items():
        base, role = split_role(stem)
        if role is None:
            companion_of, name = split_map_name(stem)
            if only_named or (name is not None and companion_of in named):
                continue  # <case>_seg, _variance ... beside a value map: not a case
        candidates.setdefault(safe_case_id(base), {}).setdefault(role, []).append(path)
    preference = (prefer, *(r for r in VALUE_MAPS if r != prefer))
    entries: Entries = {}
    for case_id, roles in candidates.items():
        if None in roles and len(roles) > 1:
            clash = sorted(str(p) for paths in roles.values() for p in paths)
            raise DataError(f"case {case_id}: several maps in {root} ({', '.join(clash)}); keep one")
        role = next((r for r in preference if r in roles), None)
        paths = roles[role]
        if len(paths) > 1:
            raise DataError(f"case {case_id}: several maps in {root} ({', '.join(str(p) for p in sorted(paths))}); keep one")
        add_entry(entries, PredictionEntry(case_id, paths[0], paths[0], role))
    return entries


def refuse_npz(root: Path, files: list[Path], format: str) -> None:
    npz = [str(p) for p in files if p.name.endswith(".npz")]
    if npz:
        raise DataError(f"{root}: a {format} folder that also holds nnU-Net .npz maps ({shown(npz)}); keep one format "
                        "per folder")


def _read(entry: PredictionEntry, channel_axis: str):
    return read_nifti_map(entry.path, channel_axis)


def _class_count(entry: PredictionEntry, channel_axis: str):
    return nifti_class_count(entry.path, channel_axis)


def _discover_segcalib(root: Path, files: list[Path], prefer: str) -> tuple[Entries, dict[str, Any]]:
    refuse_npz(root, files, "segcalib")
    metadata = read_json(root / EXPORT_JSON) if (root / EXPORT_JSON).is_file() else {}
    return nifti_entries(root, files, prefer, only_named=True), metadata


def _discover_nifti(root: Path, files: list[Path], prefer: str) -> tuple[Entries, dict[str, Any]]:
    refuse_npz(root, files, "nifti")
    return nifti_entries(root, files, prefer, only_named=False), {}


register_format(PredictionFormat(
    name="segcalib",
    holds=f"<case>_probs{MAP_ENDING} or <case>_logits{MAP_ENDING} beside {EXPORT_JSON}",
    detect=lambda root, files: any(p.name == EXPORT_JSON for p in files),
    discover=_discover_segcalib,
    read=_read,
    class_count=_class_count,
    expected_file=lambda case_id: map_path(Path(), case_id, "probs").name,
))

register_format(PredictionFormat(
    name="nifti",
    holds=f"<case>.nii, <case>.nii.gz, <case>_probs{MAP_ENDING} or <case>_logits{MAP_ENDING}",
    detect=lambda root, files: (any(nifti_ending(p) for p in files)
                                and not any(p.name.endswith(".npz") for p in files)),
    discover=_discover_nifti,
    read=_read,
    class_count=_class_count,
    expected_file=lambda case_id: f"{case_id}.nii.gz (or {case_id}_probs{MAP_ENDING})",
))
