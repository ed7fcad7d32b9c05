"""``segcalib export``: calibrated probability maps of a split, in each input's own geometry.

Per case (in ``output``): ``<case>_probs.nii.gz`` (4D, class last, float32; or 16-bit on request:
NIfTI has no half-float type, so ``float16`` is stored as uint16 with ``scl_slope = 1/65535``,
which every reader turns back into floats in [0, 1] with a step of 1.5e-5),
``<case>_seg.nii.gz`` (uint8 argmax) and optionally ``<case>_uncertainty.nii.gz`` (entropy,
nats). Every file is written under a temporary name and renamed; ``export.json`` records the
model, checkpoint, temperature (and the voxels it was fitted on), config hash and versions.
A rerun with the same settings skips cases whose outputs are all there, reuses the recorded
temperature instead of fitting it again, and leaves a complete export untouched.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcalib import __version__
from segcalib.data import Case, check_manifest, load_manifest, save_like
from segcalib.data.transforms import case_to_item, preprocessing
from segcalib.errors import DataError, RunError
from segcalib.export.geometry import channels_last, to_file_geometry
from segcalib.inference.sliding_window import predict_logits
from segcalib.inference.temperature import (
    DEFAULT_MAX_VOXELS,
    TemperatureRequest,
    VoxelSample,
    apply_temperature_,
    fit_temperature,
)
from segcalib.inference.trained_model import TrainedModel, load_trained_model
from segcalib.spatial.regions import DEFAULT_BOUNDARY_MM, RegionContext, region_mask
from segcalib.spatial.spacing import spacing_from_affine
from segcalib.utils.files import write_text_atomic, write_with
from segcalib.utils.progress import progress_bar

log = logging.getLogger("segcalib")
EXPORT_JSON = "export.json"
UINT16_MAX = 65535


@dataclass
class ExportOptions:
    split: str = "test"
    temperature: TemperatureRequest = field(default_factory=TemperatureRequest)
    checkpoint: str = "best"
    dtype: str = "float32"
    uncertainty: bool = False
    max_fit_voxels: int = DEFAULT_MAX_VOXELS
    boundary_mm: float = DEFAULT_BOUNDARY_MM  # of the boundary region a temperature is fitted on
    device: str | None = None
    progress: bool = True


@dataclass
class ExportResult:
    output: Path
    cases: list[str]
    skipped: list[str]
    temperature: float
    info: dict[str, Any] = field(default_factory=dict)


def output_paths(output: Path, case_id: str, uncertainty: bool) -> dict[str, Path]:
    paths = {"probs": output / f"{case_id}_probs.nii.gz", "seg": output / f"{case_id}_seg.nii.gz"}
    if uncertainty:
        paths["uncertainty"] = output / f"{case_id}_uncertainty.nii.gz"
    return paths


def export(run_dir: str | Path, manifest_path: str | Path, output: str | Path, options: ExportOptions) -> ExportResult:
    """Export probability maps for ``options.split`` of ``manifest_path`` into ``output``."""
    output = Path(output)
    if options.dtype not in ("float32", "float16"):
        raise DataError(f"--dtype: {options.dtype!r} is not float32 or float16")
    model = load_trained_model(run_dir, options.checkpoint, options.device)
    manifest = load_manifest(manifest_path, split_seed=model.cfg.data.split_seed)
    if manifest.num_classes != model.num_classes:
        raise DataError(
            f"{manifest.path}: declares {manifest.num_classes} classes but the model predicts {model.num_classes}"
        )
    cases = manifest.cases(options.split)
    if not cases:
        raise DataError(f"{manifest.path}: split {options.split!r} has no cases")
    check_manifest(manifest, splits=(options.split,))

    request = _temperature_request(options)
    settings = _settings(model, manifest.path, options, request)
    previous = _previous_export(output)
    if previous is not None and _same_export(previous, settings) and previous.get("temperature_request") == request:
        temperature, fit_info = float(previous["temperature"]), previous.get("temperature_fit", {})
        if previous.get("status") == "complete" and _all_written(output, cases, options.uncertainty):
            log.info("%s: complete export with these settings; nothing to do", output)
            ids = [c.case_id for c in cases]
            return ExportResult(output, [], ids, temperature, previous)
    else:
        temperature, fit_info = _temperature(model, options)
    settings.update(temperature=temperature, temperature_fit=fit_info)
    _claim_output(output, settings, previous)

    chain = preprocessing(model.cfg.data, with_label=False)
    done, skipped = [], []
    bar = progress_bar(len(cases), "export", options.progress)
    for case in cases:
        paths = output_paths(output, case.case_id, options.uncertainty)
        if _written(paths):
            skipped.append(case.case_id)
        else:
            export_case(model, case, chain, paths, temperature, options.dtype)
            done.append(case.case_id)
        bar.update(1)
    bar.close()
    settings["status"] = "complete"
    settings["cases"] = [c.case_id for c in cases]
    settings["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_text_atomic(output / EXPORT_JSON, json.dumps(settings, indent=1))
    return ExportResult(output, done, skipped, temperature, settings)


def _written(paths: dict[str, Path]) -> bool:
    return all(p.exists() for p in paths.values())


def _all_written(output: Path, cases: list[Case], uncertainty: bool) -> bool:
    return all(_written(output_paths(output, c.case_id, uncertainty)) for c in cases)


def export_case(
    model: TrainedModel, case: Case, chain, paths: dict[str, Path], temperature: float, dtype: str = "float32"
) -> None:
    """Predict one case and write its maps (each file atomically).

    Memory: the probabilities exist once (softmax in place, file order as a view where the
    geometry allows); the argmax and entropy maps are computed slab by slab.
    """
    item = chain(case_to_item(case))
    image = item["image"]
    logits = predict_logits(model.net, image.unsqueeze(0), model.window, device=model.device)[0]
    probs = apply_temperature_(logits.cpu(), temperature, dim=0)
    del logits
    maps = to_file_geometry(probs, image, chain)  # (K, *file_shape), often a view of probs
    del probs, item, image
    reference = case.images[0]
    array = channels_last(maps)
    if dtype == "float16":
        quantised = _slabwise(maps, lambda p: np.rint(np.moveaxis(p, 0, -1) * UINT16_MAX).astype(np.uint16), -2)
        write_with(paths["probs"], lambda tmp: save_like(quantised, reference, tmp, np.uint16, slope=1 / UINT16_MAX), suffix=".nii.gz")
        del quantised
    else:
        write_with(paths["probs"], lambda tmp: save_like(array, reference, tmp, np.float32), suffix=".nii.gz")
    seg = _slabwise(maps, lambda p: p.argmax(0).astype(np.uint8))
    write_with(paths["seg"], lambda tmp: save_like(seg, reference, tmp, np.uint8), suffix=".nii.gz")
    if "uncertainty" in paths:
        entropy = _slabwise(maps, lambda p: -(p * np.log(np.clip(p, 1e-12, None))).sum(0, dtype=np.float32))
        write_with(paths["uncertainty"], lambda tmp: save_like(entropy, reference, tmp, np.float32), suffix=".nii.gz")


def _slabwise(maps: np.ndarray, fn, axis: int = -1, slab: int = 16) -> np.ndarray:
    """Apply ``fn`` to slabs of ``maps (K, *spatial)`` along the last spatial axis; concatenate."""
    n = maps.shape[-1]
    parts = [fn(maps[..., i : i + slab]) for i in range(0, n, slab)]
    return np.ascontiguousarray(np.concatenate(parts, axis=axis))


# -- temperature -------------------------------------------------------------------------------


def _temperature_request(options: ExportOptions) -> dict[str, Any]:
    """What the user asked for (not the fitted value): a rerun with the same request reuses T."""
    record = options.temperature.record()
    if options.temperature.mode == "fit":
        record.update(max_voxels=options.max_fit_voxels, boundary_mm=options.boundary_mm)
    return record


def _temperature(model: TrainedModel, options: ExportOptions) -> tuple[float, dict[str, Any]]:
    request = options.temperature
    if request.mode != "fit":
        return request.value, {"mode": request.mode}
    region = request.region
    sample, n_cases = collect_validation_voxels(model, region, options.max_fit_voxels, options.boundary_mm)
    try:
        t = fit_temperature(sample.logits, sample.targets)
    except ValueError as exc:  # non-finite logits: the checkpoint holds NaN weights
        raise RunError(f"{model.checkpoint}: temperature fit on {region} validation voxels failed: {exc}") from None
    log.info("temperature fitted on %d %s validation voxels: T = %.4f", len(sample), region, t)
    return t, {
        "mode": "fit",
        "region": region,
        "voxels_used": len(sample),
        "voxels_offered": sample.offered,
        "validation_cases": n_cases,
    }


def collect_validation_voxels(
    model: TrainedModel, region: str, max_voxels: int, boundary_mm: float
) -> tuple[VoxelSample, int]:
    """A seeded voxel sample (logits, labels) of the run's own validation cases in ``region``,
    and the number of cases it was drawn from."""
    cfg = model.cfg
    manifest = load_manifest(cfg.data.manifest, split_seed=cfg.data.split_seed)
    cases = [c for c in manifest.cases("validation") if c.label is not None]
    if not cases:
        raise DataError(f"{manifest.path}: --temperature fit needs labelled validation cases; the run's manifest has none")
    chain = preprocessing(cfg.data, with_label=True)
    sample = VoxelSample(max_voxels=max_voxels, seed=cfg.train.seed)
    for case in cases:
        item = chain(case_to_item(case))
        image, label = item["image"], item["label"]
        logits = predict_logits(model.net, image.unsqueeze(0), model.window, device=model.device)
        target = label.as_tensor().long()  # (1, *spatial) = (B, *spatial)
        target = target.to(logits.device)
        spacing = [spacing_from_affine(image.affine)]
        context = RegionContext(target=target, spacing=spacing, num_classes=model.num_classes, boundary_mm=boundary_mm)
        sample.add(logits, target, region_mask(region, context))
    if len(sample) == 0:
        raise DataError(f"{manifest.path}: no validation voxels in region {region!r} to fit a temperature on")
    return sample, len(cases)


# -- bookkeeping -------------------------------------------------------------------------------


def _settings(model: TrainedModel, manifest: Path, options: ExportOptions, request: dict[str, Any]) -> dict[str, Any]:
    """The export record (``temperature`` and ``temperature_fit`` are added once known)."""
    import monai
    import nibabel

    return {
        "status": "running",
        "run": str(model.run_dir.resolve()),
        "model": model.cfg.model.name,
        "loss": model.cfg.loss.name,
        "checkpoint": str(Path(model.checkpoint).resolve()),
        "checkpoint_epoch": model.epoch,
        "config_hash": model.config_hash,
        "manifest": str(Path(manifest).resolve()),
        "split": options.split,
        "split_seed": model.cfg.data.split_seed,
        "temperature_request": request,
        "boundary_mm": options.boundary_mm,
        "dtype": options.dtype,
        "uncertainty": options.uncertainty,
        "class_names": model.class_names,
        "device": str(model.device),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": {
            "segcalib": __version__,
            "torch": str(torch.__version__),
            "monai": monai.__version__,
            "nibabel": nibabel.__version__,
            "python": platform.python_version(),
        },
    }


_SAME_EXPORT_KEYS = ("checkpoint", "checkpoint_epoch", "config_hash", "manifest", "split", "dtype", "uncertainty")


def _previous_export(output: Path) -> dict[str, Any] | None:
    """The record of an earlier export into ``output``, if any."""
    path = output / EXPORT_JSON
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise RunError(f"{path}: unreadable; remove it or choose another --output") from None
    if not isinstance(record, dict):
        raise RunError(f"{path}: not an export record; remove it or choose another --output")
    return record


def _same_export(previous: dict[str, Any], settings: dict[str, Any]) -> bool:
    return all(previous.get(k) == settings.get(k) for k in _SAME_EXPORT_KEYS)


def _claim_output(output: Path, settings: dict[str, Any], previous: dict[str, Any] | None) -> None:
    """Refuse to mix two different exports in one folder; record this one as running."""
    previous_path = output / EXPORT_JSON
    if previous is not None:
        changed = [k for k in _SAME_EXPORT_KEYS if previous.get(k) != settings.get(k)]
        if abs(float(previous.get("temperature", 1.0)) - settings["temperature"]) > 1e-6 * settings["temperature"]:
            changed.append("temperature")
        if changed:
            raise RunError(
                f"{output}: holds an export with other settings ({', '.join(changed)}); "
                "choose another --output or remove it"
            )
    elif output.exists() and any(output.glob("*_probs.nii.gz")):
        raise RunError(f"{output}: holds probability maps but no {EXPORT_JSON}; choose another --output")
    output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(previous_path, json.dumps(settings, indent=1))
