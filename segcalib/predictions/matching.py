"""Pair manifest cases with prediction maps, and check a map against its label's geometry."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from segcalib.data.manifest import SPLIT_SEED, Case, Manifest, load_manifest
from segcalib.data.volumes import VolumeHeader
from segcalib.errors import DataError
from segcalib.predictions.folder import PredictionEntry, PredictionFolder
from segcalib.predictions.maps import PredictionMap

log = logging.getLogger("segcalib")
FOLDS = "folds"  # the cases of an nnU-Net trainer folder: every labelled case with an out-of-fold map
AFFINE_TOL = 1e-4  # mm, as segcalib.data.check compares image and label


def match_cases(folder: PredictionFolder, cases: Iterable[Case]) -> list[tuple[Case, PredictionEntry]]:
    """``(case, entry)`` for every case, in the given order.

    Every case needs a map: the error names the file the first missing case's map would be, and
    all the cases without one (up to ten). Maps of other cases (another split's) are left out and
    named in an info line. For nnU-Net folders the segmentation that gives the geometry must be
    there too.
    """
    cases = list(cases)
    missing = [c.case_id for c in cases if c.case_id not in folder]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DataError(
            f"case {missing[0]}: no prediction map in {folder.root} ({len(missing)} of {len(cases)} case(s) have "
            f"none: {shown}; looked for {folder.expected_file(missing[0])}: the folder's {folder.format} maps are "
            "named after the case ids)"
        )
    wanted = {c.case_id for c in cases}
    extra = [case_id for case_id in folder.case_ids() if case_id not in wanted]
    if extra:
        files = [str(folder.entry(case_id).path) for case_id in extra[:3]]
        log.info("%s: %d map(s) of cases not asked for are left out (%s%s)", folder.root, len(extra),
                 ", ".join(files), " ..." if len(extra) > 3 else "")
    pairs = [(c, folder.entry(c.case_id)) for c in cases]
    for case, entry in pairs:
        if entry.geometry is None:
            raise DataError(f"case {case.case_id}: {entry.path} has no segmentation beside it to give its geometry")
    return pairs


def check_geometry(pred: PredictionMap, label_header: VolumeHeader, num_classes: int | None = None) -> None:
    """Raise a :class:`DataError` naming both files unless ``pred`` lies on the label's voxels:
    same spatial shape, affines equal within :data:`AFFINE_TOL` mm, and (if given) ``num_classes``."""
    where = str(pred.source) if pred.geometry_file == pred.source else f"{pred.source} (geometry of {pred.geometry_file})"
    if num_classes is not None and pred.num_classes != num_classes and pred.spatial_shape[:1] == (num_classes,):
        raise DataError(f"{where}: {pred.num_classes} classes on the last axis, the manifest of {label_header.path} "
                        f"declares {num_classes}; its first axis has {num_classes}: if the class axis is first, "
                        "pass --channel-axis first")
    label_shape = tuple(label_header.shape[: len(pred.spatial_shape)])
    if len(label_header.shape) < len(pred.spatial_shape) or pred.spatial_shape != label_shape:
        raise DataError(f"{where}: spatial shape {pred.spatial_shape} differs from the label {label_header.path} "
                        f"shape {tuple(label_header.shape)}")
    if not np.allclose(pred.affine, label_header.affine, atol=AFFINE_TOL, rtol=0):
        worst = float(np.abs(np.asarray(pred.affine) - label_header.affine).max())
        raise DataError(f"{where}: affine differs from the label {label_header.path} by up to {worst:.3g} mm "
                        f"(tolerance {AFFINE_TOL:g}): not on the same voxels")
    if num_classes is not None and pred.num_classes != num_classes:
        raise DataError(f"{where}: {pred.num_classes} classes, the manifest of {label_header.path} declares {num_classes}")


def check_label_values(label: np.ndarray, num_classes: int, ignore_label: int | None, path) -> None:
    """A DataError naming ``path`` unless every value of ``label`` is a class (``0..num_classes-1``)
    or the manifest's ``ignore_label``."""
    if label.size == 0 or (int(label.min()) >= 0 and int(label.max()) < num_classes):
        return
    bad = (label < 0) | (label >= num_classes)
    if ignore_label is not None:
        bad &= label != ignore_label
    if bad.any():
        values = np.unique(label[bad])
        shown = ", ".join(str(int(v)) for v in values[:5]) + (" ..." if values.size > 5 else "")
        ignore = f" or the ignore label {ignore_label}" if ignore_label is not None else ""
        raise DataError(f"{path}: label value(s) {shown} are not classes of the manifest (0..{num_classes - 1}{ignore})")


def split_seed_of(folder: PredictionFolder, given: int | None = None) -> int:
    """``given``, else the seed a segcalib export recorded for its manifest's split, else the default."""
    if given is not None:
        return given
    return int((folder.metadata or {}).get("split_seed", SPLIT_SEED)) if folder.format == "segcalib" else SPLIT_SEED


def default_split(folder: PredictionFolder) -> str:
    """:data:`FOLDS` for an nnU-Net trainer folder read through its folds, else ``validation``."""
    return FOLDS if "folds" in folder.metadata else "validation"


def labelled_pairs(
    folder: PredictionFolder, manifest_path, split: str | None, split_seed: int | None, purpose: str
) -> tuple[Manifest, list[tuple[Case, PredictionEntry]]]:
    """The manifest (split as the export that wrote ``folder`` split it, unless ``split_seed`` is
    given) and its labelled ``split`` cases matched to their maps; a DataError naming the manifest
    when the split has no labelled case (``purpose``: what the labels are needed for).

    ``split`` None: :func:`default_split`. :data:`FOLDS` (a trainer folder): every labelled case of
    the manifest, whatever split segcalib gave it, that has a fold's validation map -- nnU-Net
    trained on all of them, and each map is out of fold; the labelled cases without one (folds not
    trained) are counted in a warning."""
    manifest = load_manifest(manifest_path, split_seed=split_seed_of(folder, split_seed))
    split = split or default_split(folder)
    if split != FOLDS:
        cases = manifest.labelled(split)
        if not cases:
            raise DataError(f"{manifest.path}: split {split!r} has no labelled cases to {purpose}")
        return manifest, match_cases(folder, cases)
    if "folds" not in folder.metadata:
        raise DataError(f"{folder.root}: split {FOLDS!r} needs an nnU-Net trainer folder (fold_<k>/validation), "
                        f"this is a {folder.format} folder")
    labelled = [c for name in manifest.splits for c in manifest.splits[name] if c.label is not None]
    cases = [c for c in labelled if c.case_id in folder]
    if not cases:
        raise DataError(f"{manifest.path}: none of its {len(labelled)} labelled case(s) has a map in the folds of "
                        f"{folder.root} (looked for {folder.expected_file(labelled[0].case_id) if labelled else 'any'})")
    without = [c.case_id for c in labelled if c.case_id not in folder]
    if without:
        log.warning("%s: %d of the manifest's %d labelled case(s) have no fold validation map (folds not trained, or "
                    "cases nnU-Net did not train on), left out: %s%s", folder.root, len(without), len(labelled),
                    ", ".join(without[:5]), " ..." if len(without) > 5 else "")
    return manifest, match_cases(folder, cases)
