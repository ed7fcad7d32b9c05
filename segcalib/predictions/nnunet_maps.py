"""The ``nnunet`` prediction format: an nnU-Net v2 folder written with ``--save_probabilities``.

``<case>.npz`` (``probabilities``, ``(C, z, y, x)``) beside the segmentation ``<case>.nii.gz`` (or
``.nii``, ``.mha``, ``.nrrd``) whose header gives the geometry. The ``.pkl`` files nnU-Net writes
beside them are never opened. A trainer output folder
(``nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>``, no maps of its own) is read as
the union of its ``fold_<k>/validation`` folders: the out-of-fold maps of every training case that
``nnUNetv2_train ... --npz`` keeps, what a calibrator should be fitted on.

Two segmentations beside one ``.npz``, an ``.npz`` and a NIfTI map of one case, and NIfTI maps of
another format mixed in are errors naming the files; 3D files without an ``.npz`` are not maps.
Region-based datasets (``regions_class_order`` in the folder's ``dataset.json``: sigmoid maps, one
per region) are refused: segcalib's calibrators and metrics take softmax maps over classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segcalib.data.manifest import refuse_regions, safe_case_id
from segcalib.data.volumes import read_header
from segcalib.errors import DataError
from segcalib.predictions.formats import (
    Entries,
    PredictionEntry,
    PredictionFormat,
    add_entry,
    optional_json,
    register_format,
    shown,
)
from segcalib.predictions.nifti_maps import nifti_ending, split_role
from segcalib.predictions.readers import nnunet_class_count, read_nnunet_map

SEG_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")
DATASET_JSON = "dataset.json"


def cross_validation_folders(root: Path) -> list[Path]:
    """``fold_<k>/validation`` folders of an nnU-Net trainer output folder, in fold order;
    ``fold_all`` (trained on every case, so with no held-out case) is not one of them."""
    folds = [p / "validation" for p in root.glob("fold_*") if p.name[5:].isdigit() and (p / "validation").is_dir()]
    return sorted(folds, key=lambda p: int(p.parent.name[5:]))


def is_map_file(path: Path) -> bool:
    return path.name.endswith(".npz") or nifti_ending(path) is not None


def _discover(root: Path, files: list[Path], prefer: str) -> tuple[Entries, dict[str, Any]]:
    folds = cross_validation_folders(root)
    if folds and not any(is_map_file(p) for p in files):
        entries: Entries = {}
        for folder in folds:
            for entry in _fold_entries(folder).values():
                add_entry(entries, entry)
        metadata = {**_dataset(root), "folds": [str(f) for f in folds]}
        return entries, metadata
    return _entries(root, files), _dataset(root)


def _dataset(root: Path) -> dict[str, Any]:
    """The folder's ``dataset.json`` (informative only: a missing or unreadable one is no obstacle,
    a region-based one is refused)."""
    dataset = optional_json(root / DATASET_JSON)
    refuse_regions(dataset, root / DATASET_JSON)
    return dataset


def _fold_entries(folder: Path) -> Entries:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not any(p.name.endswith(".npz") for p in files):
        raise DataError(f"{folder}: no .npz probability maps; nnU-Net writes the validation probabilities only when "
                        "trained with --npz (or rerun: nnUNetv2_train DATASET CONFIG FOLD --val --npz)")
    return _entries(folder, files)


def _entries(root: Path, files: list[Path]) -> Entries:
    by_name = {p.name: p for p in files}
    entries: Entries = {}
    npz_stems = {p.name[: -len(".npz")]: p for p in files if p.name.endswith(".npz")}
    for stem, path in npz_stems.items():
        segs = [by_name[stem + e] for e in SEG_ENDINGS if stem + e in by_name]
        if len(segs) > 1:
            raise DataError(f"{path}: several segmentations beside it ({', '.join(str(s) for s in segs)}); keep one")
        if segs and _is_nifti_map(segs[0]):
            raise DataError(f"case {safe_case_id(stem)}: two maps in {root}, {path} and the 4D {segs[0]} (where "
                            "nnU-Net keeps the segmentation); keep one")
        add_entry(entries, PredictionEntry(safe_case_id(stem), path, segs[0] if segs else None, "probs"))
    if npz_stems:
        _refuse_nifti_maps(root, files, npz_stems)
    return entries


def _refuse_nifti_maps(root: Path, files: list[Path], npz_stems: dict[str, Path]) -> None:
    """NIfTI maps in an nnU-Net folder: a second map of a case (an error naming both) or maps of
    another format mixed in (an error naming them). 3D files without an ``.npz`` are not maps."""
    strays = []
    for path in files:
        ending = nifti_ending(path)
        if ending is None:
            continue
        stem = path.name[: -len(ending)]
        base, role = split_role(stem)
        if role is not None and base in npz_stems:
            raise DataError(f"case {safe_case_id(base)}: two maps in {root}, {npz_stems[base]} and {path}; keep one")
        if stem not in npz_stems and (role is not None or _is_nifti_map(path, unreadable=False)):
            strays.append(str(path))
    if strays:
        raise DataError(f"{root}: mixes nnU-Net .npz maps with NIfTI maps ({shown(strays)}); keep one format per "
                        "folder (every case would otherwise be read from the .npz files only)")


def _is_nifti_map(path: Path, unreadable: bool | None = None) -> bool:
    """A NIfTI file with a class axis (4D, more than one entry on the last axis); an unreadable
    file is ``unreadable`` (None: its DataError is raised)."""
    if nifti_ending(path) is None:
        return False
    try:
        shape = read_header(path).shape
    except DataError:
        if unreadable is None:
            raise
        return unreadable
    return len(shape) >= 4 and shape[-1] > 1


def _read(entry: PredictionEntry, channel_axis: str):
    if entry.geometry is None:
        raise DataError(f"{entry.path}: no segmentation {entry.path.name[:-4]}{{{','.join(SEG_ENDINGS)}}} beside it "
                        "(nnU-Net writes one per case; it gives the geometry)")
    return read_nnunet_map(entry.path, entry.geometry)


def _detect(root: Path, files: list[Path]) -> bool:
    if any(p.name.endswith(".npz") for p in files):
        return True
    return bool(cross_validation_folders(root)) and not any(is_map_file(p) for p in files)


register_format(PredictionFormat(
    name="nnunet",
    holds="<case>.npz from nnUNetv2_predict --save_probabilities, beside <case>.nii.gz (or a trainer folder's "
          "fold_<k>/validation)",
    detect=_detect,
    discover=_discover,
    read=_read,
    class_count=lambda entry, channel_axis: nnunet_class_count(entry.path),
    expected_file=lambda case_id: f"{case_id}.npz",
    class_axis="first",
))
