"""``segcalib calibrate fit`` / ``apply``: post-hoc calibration of any model's maps, read from a
prediction folder (a segcalib export, an nnU-Net ``--save_probabilities`` folder, 4D NIfTI maps),
one case at a time.

Fitting streams the cases through a calibrator's bounded statistics (``update``), restricted to
the voxels of a ground-truth region; ``auto`` chooses the method by k-fold cross-validation over
cases (:mod:`segcalib.calibrators.selection`). Under ``torchrun`` the cases of a single-method fit
are shared out and the states merged on rank 0, which fits and writes (``auto`` runs on rank 0).
Applying writes the same files as ``segcalib export`` (atomic, resumable) in each input's own
geometry, and an ``export.json`` that records the calibrator, so ``evaluate`` and ``report``
work unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcalib.calibrators import Calibrator, build_calibrator, load_calibrator, read_calibrator_json, save_calibrator
from segcalib.calibrators.criteria import BALANCED, CV_FIT_VOXELS
from segcalib.calibrators.input_space import check_convertible, describe, to_space, warn_unrecorded
from segcalib.calibrators.selection import ground_truth_masks, select_calibrator
from segcalib.data import Case, load_manifest, read_volume
from segcalib.errors import DataError
from segcalib.export.record import EXPORT_JSON, claimed_output, differences, finish, now, previous_record, versions
from segcalib.export.writers import all_written, check_dtype, output_paths, write_probability_maps
from segcalib.predictions import PredictionFolder, PredictionMap, check_geometry, match_cases, open_predictions
from segcalib.predictions.matching import check_label_values, default_split, labelled_pairs
from segcalib.spatial.regions import ALL, DEFAULT_BOUNDARY_MM
from segcalib.spatial.spacing import spacing_from_affine
from segcalib.utils.devices import select_device
from segcalib.utils.distributed import gather_objects, is_main_process, rank, world_size
from segcalib.utils.progress import progress_bar
from segcalib.utils.threads import cpu_threads

log = logging.getLogger("segcalib")


@dataclass
class FolderOptions:
    """How to read a prediction folder (see :func:`segcalib.predictions.open_predictions`)."""

    format: str = "auto"
    channel_axis: str = "last"
    input: str = "auto"


@dataclass
class FitOptions:
    split: str | None = None  # None: validation, or every fold's cases of an nnU-Net trainer folder
    method: str = "auto"
    region: str = ALL
    preserve: str = "none"
    folds: int = 5
    criterion: str = BALANCED
    fit_voxels: int = CV_FIT_VOXELS
    progress: bool = False
    boundary_mm: float = DEFAULT_BOUNDARY_MM
    max_voxels: int | None = None
    seed: int = 0
    use_image: bool = False
    split_seed: int | None = None
    device: str | None = None
    folder: FolderOptions = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.folder = self.folder or FolderOptions()


def as_logits(pred: PredictionMap, device: torch.device, space: str | None = None) -> torch.Tensor:
    """``(1, C, *spatial)`` float32 input of a calibrator working in ``space`` (see
    :mod:`segcalib.calibrators.input_space`; None: logits as they are, ``log max(p, 1e-12)`` for
    probabilities, the space of a fit on such maps)."""
    return to_space(torch.from_numpy(pred.values).to(device), pred.kind, space, dim=0).unsqueeze(0)


def fit_on_predictions(predictions: str | Path, manifest_path: str | Path, output: str | Path, options: FitOptions) -> dict[str, Any]:
    """Fit ``options.method`` (or choose one, ``auto``) on the labelled ``options.split`` cases
    of ``manifest_path`` whose maps are in ``predictions``; write ``output/calibrator.json``.

    On the CPU the whole fit runs with one torch thread (:func:`segcalib.utils.threads.cpu_threads`):
    it is many small operations per case, which extra threads slow down on a busy machine."""
    if select_device(options.device).type == "cpu":
        with cpu_threads():
            return _fit_on_predictions(predictions, manifest_path, output, options)
    return _fit_on_predictions(predictions, manifest_path, output, options)


def _cv_groups(folder: PredictionFolder, cases: list[Case]) -> dict[str, str | None]:
    """The group of each case that ``auto``'s folds keep together: its nnU-Net fold when the maps come
    from two or more folds' models (a calibrator is scored on a model it was not fitted on), else
    the manifest's ``group`` (one trained fold is one model: its cases are independent)."""
    folds = {case.case_id: folder.fold_of(case.case_id) for case in cases}
    if len({f for f in folds.values() if f is not None}) < 2:
        return {case.case_id: case.group for case in cases}
    return {case.case_id: folds[case.case_id] or case.group for case in cases}


def _fit_on_predictions(predictions: str | Path, manifest_path: str | Path, output: str | Path, options: FitOptions) -> dict[str, Any]:
    output = Path(output)
    folder = open_predictions(predictions, **vars(options.folder))
    split = options.split or default_split(folder)
    manifest, pairs = labelled_pairs(folder, manifest_path, split, options.split_seed, "fit a calibrator on")
    device = select_device(options.device)
    num_classes = manifest.num_classes
    limits = {} if options.max_voxels is None else {"max_voxels": options.max_voxels}
    started = time.time()
    kinds: set[str] = set()
    for case, _ in pairs:  # before anything is fitted: every map has the manifest's classes
        folder.class_count(case.case_id, expected=num_classes, by=f"the manifest {manifest.path}")

    def stream(share: bool) -> Iterator[tuple]:
        mine = pairs[rank() :: world_size()] if share else pairs
        for case, _ in mine:
            yield _fit_item(folder, case, num_classes, device, options.use_image, kinds, manifest.ignore_label)

    extra: dict[str, Any]
    if options.method == "auto":
        selection = select_calibrator(
            lambda: stream(False), [c.case_id for c, _ in pairs], num_classes, criterion=options.criterion,
            preserve=options.preserve, folds=options.folds, seed=options.seed, fit_region=options.region,
            boundary_mm=options.boundary_mm, fit_voxels=options.fit_voxels,
            groups=_cv_groups(folder, [c for c, _ in pairs]), progress=options.progress,
            **limits,
        ) if is_main_process() else None
        if selection is None:
            return {}
        calibrator, extra = selection.calibrator, {"selection": selection.report()}
        if options.progress:
            print(selection.table_text(), flush=True)
    else:
        calibrator = build_calibrator(options.method, num_classes, seed=options.seed, **limits)
        for case_id, logits, target, spacing, image in stream(True):  # ignored voxels are in no region
            mask = ground_truth_masks(target, spacing, num_classes, options.boundary_mm, (options.region,))[options.region]
            calibrator.update(logits, target, mask, spacing=[spacing], image=image)
        calibrator = _merged(calibrator)
        if calibrator is None:
            return {}
        calibrator.fit()
        extra = {}
    extra.update(
        fit_region=options.region,
        ignore_label=manifest.ignore_label,
        boundary_mm=options.boundary_mm,
        split=split,
        cases=[c.case_id for c, _ in pairs],
        predictions=str(Path(predictions).resolve()),
        prediction_format=folder.format,
        manifest=str(manifest.path.resolve()),
        classes_names=manifest.class_names,
        use_image=options.use_image,
        seconds=round(time.time() - started, 3),
        time=now(),
        versions=versions(),
    )
    output.mkdir(parents=True, exist_ok=True)
    (fitted_on,) = kinds or {"logits"}  # one kind per folder (PredictionFolder checks it)
    save_calibrator(calibrator, output, extra=extra, fitted_on=fitted_on, source_format=folder.format)
    return read_calibrator_json(output)


def _fit_item(folder, case, num_classes: int, device: torch.device, use_image: bool,
              kinds: set[str] | None = None, ignore_label: int | None = None) -> tuple:
    """``(case_id, logits (1, C, *S), target (1, *S), spacing, image (1, Cin, *S) | None)``; the
    map's kind is added to ``kinds`` (what the fitted calibrator records as its input space).
    ``target`` holds classes and, where nnU-Net's ``ignore_label`` is, that value (above every
    class: the fit's region masks leave it out)."""
    label, header = read_volume(case.label, dtype=np.int64)
    check_label_values(label, num_classes, ignore_label, case.label)
    pred = folder.read(case.case_id)
    check_geometry(pred, header, num_classes)
    if kinds is not None:
        kinds.add(pred.kind)
    image = None
    if use_image:
        arrays = [read_volume(p, dtype=np.float32)[0] for p in case.images]
        image = torch.from_numpy(np.stack(arrays)).unsqueeze(0).to(device)
    target = torch.from_numpy(label).unsqueeze(0).to(device)
    return case.case_id, as_logits(pred, device), target, tuple(header.spacing), image


def _merged(calibrator: Calibrator) -> Calibrator | None:
    """Every process's statistics merged on rank 0 (None on the other ranks)."""
    parts = gather_objects(calibrator)
    if not is_main_process():
        return None
    for other in parts[1:]:
        calibrator.merge(other)
    return calibrator


def apply_to_predictions(
    calibrator_dir: str | Path,
    predictions: str | Path,
    output: str | Path,
    *,
    dtype: str = "float32",
    uncertainty: bool = False,
    manifest_path: str | Path | None = None,
    folder_options: FolderOptions | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Calibrated maps of every case of ``predictions`` into ``output`` (the files of
    ``segcalib export``), with an ``export.json`` that records the calibrator.

    Every check that needs no voxel data (options, the calibrator file, the folder's format and
    files, each map's class count, the input space of the first map) runs before ``export.json``
    is written; a map that fails later (NaN, another kind, a calibrated map that is not finite)
    puts the folder back as it was (:func:`~segcalib.export.record.claimed_output`)."""
    output = Path(output)
    check_dtype(dtype)
    if output.resolve() == Path(predictions).resolve():
        raise DataError(f"{output}: --output must differ from --predictions (the maps would overwrite their source)")
    record = read_calibrator_json(calibrator_dir)
    calibrator = load_calibrator(calibrator_dir)
    folder = open_predictions(predictions, **vars(folder_options or FolderOptions()))
    images = _image_files(calibrator, calibrator_dir, manifest_path)
    device_ = select_device(device)
    case_ids = folder.case_ids()
    for case_id in case_ids:
        folder.class_count(case_id, expected=calibrator.num_classes, by=f"the calibrator {calibrator_dir}")
    space = calibrator.input_space
    if space is None:
        warn_unrecorded(str(calibrator_dir))
    _check_first_map(folder, case_ids, space, calibrator_dir)
    settings = _apply_settings(record, calibrator_dir, folder, dtype, uncertainty)
    previous = previous_record(output)
    extra = ["uncertainty"] if uncertainty else []
    keys = ("source", "calibrator", "dtype", "uncertainty")
    if (
        previous is not None and previous.get("status") == "complete" and not differences(previous, settings, keys)
        and previous.get("cases") == case_ids and all(all_written(output_paths(output, c, extra)) for c in case_ids)
    ):
        log.info("%s: complete with this calibrator; nothing to do", output)
        return previous
    with claimed_output(output, settings, previous, keys) if is_main_process() else contextlib.nullcontext():
        bar = progress_bar(len(case_ids), "calibrate", progress and is_main_process())
        for case_id in case_ids[rank() :: world_size()]:
            paths = output_paths(output, case_id, extra)
            if not all_written(paths):
                _calibrate_case(calibrator, calibrator_dir, folder, case_id, images, device_, paths, dtype)
            bar.update(1)
        bar.close()
    gather_objects(None)  # every rank's cases are written before rank 0 marks the folder complete
    return finish(output, settings, case_ids) if is_main_process() else settings


def _check_first_map(folder, case_ids: list[str], space: str | None, calibrator_dir) -> None:
    """The first map's kind against the calibrator's space, before anything is written (the
    folder holds one kind: every later map is held to it as it is read)."""
    if not case_ids:
        return
    entry = folder.entry(case_ids[0])
    kind = entry.hint if folder.input == "auto" and entry.hint == "probs" else None
    if kind is None:
        kind = folder.read(case_ids[0]).kind
    check_convertible(space, kind, str(calibrator_dir), case_ids[0])


def _calibrate_case(calibrator: Calibrator, calibrator_dir, folder, case_id: str, images, device: torch.device,
                    paths: dict[str, Path], dtype: str) -> None:
    pred = folder.read(case_id)
    if pred.num_classes != calibrator.num_classes:
        raise DataError(f"{pred.source}: {pred.num_classes} classes; the calibrator {calibrator_dir} has "
                        f"{calibrator.num_classes}")
    check_convertible(calibrator.input_space, pred.kind, str(calibrator_dir), case_id)
    image = _image(images, case_id, device)
    inputs = as_logits(pred, device, calibrator.input_space)
    probs = calibrator.transform(inputs, spacing=[spacing_from_affine(pred.affine)], image=image)[0].cpu().numpy()
    write_probability_maps(probs, pred.geometry_file, paths, dtype, producer=lambda: (
        f"calibrator '{calibrator.name}' of {calibrator_dir} ({calibrator.describe_params()}; input "
        f"{describe(calibrator.input_space)})"))


def _apply_settings(record: dict, calibrator_dir, folder, dtype: str, uncertainty: bool) -> dict[str, Any]:
    """export.json of a calibrated folder: the source export's facts, then the calibrator's."""
    source = dict(folder.metadata or {}) if folder.format == "segcalib" else {}
    params = record.get("params", {})
    keep = ("run", "model", "loss", "checkpoint", "checkpoint_epoch", "config_hash", "manifest", "split", "split_seed",
            "class_names", "boundary_mm")
    return {
        **{k: source[k] for k in keep if k in source},
        "status": "running",
        "source": str(folder.root.resolve()),
        "source_format": folder.format,
        "calibrator": {"folder": str(Path(calibrator_dir).resolve()), "method": record.get("method"),
                       "fit_region": record.get("fit_region"), "params": params,
                       "input_space": (record.get("input_space") or {}).get("space"),
                       "selection": (record.get("selection") or {}).get("selected")},
        "temperature": params.get("temperature"),
        "temperature_fit": {"mode": "calibrator", "method": record.get("method"), "region": record.get("fit_region")},
        "dtype": dtype,
        "uncertainty": uncertainty,
        "started": now(),
        "versions": versions(),
    }


def _image_files(calibrator: Calibrator, calibrator_dir, manifest_path) -> dict[str, list[Path]] | None:
    """Image files by case id, for calibrators that read the image (LTS with ``use_image``)."""
    if not getattr(calibrator, "use_image", False):
        return None
    if manifest_path is None:
        raise DataError(f"{calibrator_dir}: this calibrator reads the image; give --manifest to find each case's image")
    manifest = load_manifest(manifest_path)
    return {c.case_id: list(c.images) for c in manifest.all_cases()}


def _image(images: dict[str, list[Path]] | None, case_id: str, device: torch.device) -> torch.Tensor | None:
    if images is None:
        return None
    if case_id not in images:
        raise DataError(f"case {case_id}: not in the manifest, whose images the calibrator needs")
    arrays = [read_volume(p, dtype=np.float32)[0] for p in images[case_id]]
    return torch.from_numpy(np.stack(arrays)).unsqueeze(0).to(device)


__all__ = ["EXPORT_JSON", "FitOptions", "FolderOptions", "apply_to_predictions", "as_logits", "fit_on_predictions"]
