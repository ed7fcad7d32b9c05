"""``segcalib evaluate``: every metric of :mod:`segcalib.metrics` for a folder of exported maps.

For each labelled case of the split: ``<case>_probs.nii.gz`` is read (it must have the label's
shape and affine and hold probabilities), then calibration statistics per region (pooled over
the dataset and per case), Dice and surface distances per class are computed, on the GPU when
there is one. Under ``torchrun`` the cases are shared out and the states all-reduced; rank 0
writes ``report.json`` and ``report.html``.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcalib import __version__
from segcalib.data import Case, VolumeHeader, load_manifest, read_volume
from segcalib.data.manifest import SPLIT_SEED
from segcalib.errors import DataError
from segcalib.export.exporter import EXPORT_JSON
from segcalib.metrics import CalibrationMetric, dice, surface_distances_per_class
from segcalib.utils.devices import select_device
from segcalib.reports.calibration_json import calibration_json
from segcalib.spatial.regions import ALL, DEFAULT_BOUNDARY_MM, default_regions, region_description
from segcalib.utils.distributed import gather_objects, is_main_process, rank, world_size
from segcalib.utils.files import check_output_folder, write_text_atomic

log = logging.getLogger("segcalib")
PROB_SUM_TOL = 1e-4  # float32 maps sum to 1 within 1e-5; 16-bit ones within K * 7.6e-6
AFFINE_TOL = 1e-4


def evaluate(
    predictions: str | Path,
    manifest_path: str | Path,
    output: str | Path,
    split: str = "test",
    n_bins: int = 15,
    boundary_mm: float | None = None,
    device: str | torch.device | None = None,
    write_html: bool = True,
    split_seed: int | None = None,
) -> dict[str, Any]:
    """Compute the report of ``predictions`` against the manifest's ground truth; write it to ``output``.

    ``split_seed`` (for manifests without explicit splits) and ``boundary_mm`` (the boundary
    band's half-width): by default the ones the export recorded, so that the cases and the band
    are the ones the export used.
    """
    predictions, output = Path(predictions), check_output_folder(output, "report folder")  # before any work
    if not predictions.is_dir():
        raise DataError(f"{predictions}: predictions folder does not exist")
    device = select_device(device)
    export_info = _export_info(predictions)
    if split_seed is None:
        split_seed = int(export_info.get("split_seed", SPLIT_SEED))
    if boundary_mm is None:  # the band the export's calibration was fitted on: one setting
        boundary_mm = float(export_info.get("boundary_mm", DEFAULT_BOUNDARY_MM))
    manifest = load_manifest(manifest_path, split_seed=split_seed)
    warn_if_other_manifest(export_info, manifest.path, predictions)
    cases = manifest.labelled(split)
    num_classes = manifest.num_classes
    started = time.time()

    regions = default_regions()
    metric = CalibrationMetric(num_classes, n_bins=n_bins, regions=regions, boundary_mm=boundary_mm)
    rows = []
    for case in cases[rank() :: world_size()]:
        rows.append(_evaluate_case(case, predictions, num_classes, metric, device))
    rows = [r for part in gather_objects(rows) for r in part]
    order = {c.case_id: i for i, c in enumerate(cases)}
    rows.sort(key=lambda r: order[r["case"]])

    pooled = calibration_json(metric.compute())
    per_case_ece = {r["case_id"]: r for r in pooled.get("per_case", [])}
    for row in rows:
        record = per_case_ece.get(row["case"], {})
        row["calibration"] = {k: record[k] for k in ("ece", "cece", "n_voxels") if k in record}
    report = {
        "metadata": {
            "predictions": str(predictions.resolve()),
            "manifest": str(manifest.path.resolve()),
            "split": split,
            "run": export_info.get("run"),
            "model": export_info.get("model"),
            "loss": export_info.get("loss"),
            "checkpoint": export_info.get("checkpoint"),
            "checkpoint_epoch": export_info.get("checkpoint_epoch"),
            "temperature": export_info.get("temperature"),
            "temperature_fit": export_info.get("temperature_fit"),
            "config_hash": export_info.get("config_hash"),
            "class_names": manifest.class_names,
            "n_bins": n_bins,
            "boundary_mm": boundary_mm,
            "regions": {name: region_description(name, boundary_mm) for name in regions},
            "device": str(device),
            "processes": world_size(),
            "seconds": round(time.time() - started, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "versions": {"segcalib": __version__, "torch": str(torch.__version__), "python": platform.python_version()},
        },
        "calibration": {region: pooled[region] for region in regions},
        "media_foreground_ece": pooled.get("media_foreground_ece"),
        "segmentation": _segmentation_summary(rows, manifest.class_names),
        "cases": rows,
        "counts": _counts(rows, num_classes),
    }
    report["summary"] = summarise(report)
    if is_main_process():
        output.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output / "report.json", json.dumps(_finite_json(report), indent=1))
        if write_html:
            from segcalib.reports.html import render_report

            write_text_atomic(output / "report.html", render_report(report))
    return report


def _evaluate_case(case: Case, predictions: Path, num_classes: int, metric: CalibrationMetric, device: torch.device) -> dict:
    label_np, label_header = read_volume(case.label, dtype=np.int64)
    probs = load_prediction(case, predictions, num_classes, label_header)
    spacing = list(label_header.spacing)
    probs = probs.to(device)
    label = torch.from_numpy(label_np).to(device).unsqueeze(0)
    metric.update(probs, label, spacing=spacing, case_ids=[case.case_id])
    pred = probs.argmax(1)
    per_class_dice = dice(pred, label, num_classes)[0].tolist()
    distances = surface_distances_per_class(pred[0], label[0], num_classes, spacing)
    classes = [
        {"class": k, "dice": float(per_class_dice[k]), **{m: float(v) for m, v in d.items()}}
        for k, d in enumerate(distances, start=1)
    ]
    return {"case": case.case_id, "spacing": spacing, "classes": classes}


def load_prediction(case: Case, predictions: Path, num_classes: int, label_header: VolumeHeader) -> torch.Tensor:
    """Read ``<case>_probs.nii.gz`` as ``(1, K, *spatial)`` float32 and check it against the label."""
    path = predictions / f"{case.case_id}_probs.nii.gz"
    if not path.exists():
        raise DataError(f"case {case.case_id}: no prediction {path} (export the split first)")
    array, header = read_volume(path, dtype=np.float32)
    if array.ndim != 4 or array.shape[-1] != num_classes:
        raise DataError(f"case {case.case_id}: {path} has shape {array.shape}, expected (*spatial, {num_classes})")
    if array.shape[:3] != label_header.shape[:3]:
        raise DataError(
            f"case {case.case_id}: {path} has spatial shape {array.shape[:3]}, the label {case.label} has {label_header.shape[:3]}"
        )
    if not np.allclose(header.affine, label_header.affine, atol=AFFINE_TOL, rtol=0):
        raise DataError(f"case {case.case_id}: {path} and the label {case.label} have different affines")
    tolerance = PROB_SUM_TOL
    probs = torch.from_numpy(np.asarray(array, dtype=np.float32)).permute(3, 0, 1, 2).unsqueeze(0).contiguous()
    if not torch.isfinite(probs).all() or probs.min() < -tolerance or probs.max() > 1 + tolerance:
        raise DataError(f"case {case.case_id}: {path} holds values that are not probabilities (outside [0, 1] or NaN)")
    worst = float((probs.sum(1) - 1).abs().max())
    if worst > tolerance:
        raise DataError(f"case {case.case_id}: {path}: probabilities do not sum to 1 over classes (off by {worst:.2g})")
    return probs.clamp_(0, 1)


# -- summaries ---------------------------------------------------------------------------------


def _segmentation_summary(rows: list[dict], class_names: list[str]) -> dict[str, Any]:
    """Per-class means over cases and their mean over foreground classes (SPEC §4): NaN (class
    absent from both masks) is left out and counted; inf (absent from one: a missed or invented
    structure) is kept, so the mean becomes inf rather than hiding the failure."""
    per_class = {}
    for k in range(1, len(class_names)):
        entries = [c for r in rows for c in r["classes"] if c["class"] == k]
        summary: dict[str, Any] = {}
        for metric in ("dice", "hd", "hd95", "assd"):
            values = np.array([e[metric] for e in entries], dtype=np.float64)
            kept = values[~np.isnan(values)]
            summary[metric] = _mean(kept)
            finite = kept.size and np.isfinite(kept).all()
            summary[f"{metric}_std"] = float(kept.std()) if finite else summary[metric]  # NaN (no case) or inf
            summary[f"{metric}_n_nan"] = int(np.isnan(values).sum())
            summary[f"{metric}_n_inf"] = int(np.isinf(values).sum())
        per_class[class_names[k]] = summary
    means = {}
    for metric in ("dice", "hd", "hd95", "assd"):
        means[metric] = _mean(np.array([s[metric] for s in per_class.values()], dtype=np.float64))
    return {"per_class": per_class, "mean_foreground": means}


def _mean(values: np.ndarray) -> float:
    """Mean without the NaNs; inf if any value is inf; NaN if nothing is left."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


def _counts(rows: list[dict], num_classes: int) -> dict[str, int]:
    nan_cases = sum(any(math.isnan(c[m]) for c in r["classes"] for m in ("dice", "hd", "hd95", "assd")) for r in rows)
    inf_cases = sum(any(math.isinf(c[m]) for c in r["classes"] for m in ("hd", "hd95", "assd")) for r in rows)
    return {"cases": len(rows), "cases_with_nan": int(nan_cases), "cases_with_inf": int(inf_cases)}


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a report (one row of a comparison)."""
    cal = report["calibration"]
    seg = report["segmentation"]["mean_foreground"]
    out = {"dice_fg": seg["dice"], "hd95": seg["hd95"], "assd": seg["assd"]}
    out.update({f"ece_{region}": cal[region]["ece"] for region in cal})
    out.update(
        {
            "mce_all": cal[ALL]["mce"],
            "cece": cal[ALL]["cece"],
            "nll": cal[ALL]["nll"],
            "brier": cal[ALL]["brier"],
        }
    )
    out.update({f"nll_{region}": cal[region]["nll"] for region in cal if region != ALL})
    out["media_foreground_ece"] = report.get("media_foreground_ece")
    out["temperature"] = report["metadata"].get("temperature")
    return out


def _finite_json(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings "nan", "inf", "-inf" (read back with float())."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def read_report(path: str | Path) -> dict[str, Any]:
    """Load a report.json, turning the "nan"/"inf" strings back into floats; anything that is not
    a segcalib evaluation report (an export.json, ``{}``, ``[]``) is a DataError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a report.json")
    try:
        report = _floats(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable report ({exc})") from None
    missing = _missing_report_parts(report)
    if missing:
        hint = " (it is an export record: run segcalib evaluate on its folder)" if _looks_like_export(report) else ""
        raise DataError(f"{path}: not a segcalib evaluation report{hint}: {missing}")
    return report


def _missing_report_parts(report: Any) -> str:
    """What a report.json lacks (empty if nothing): the parts compare and summarise read."""
    if not isinstance(report, dict):
        return f"a JSON {type(report).__name__}, not an object"
    meta = report.get("metadata")
    if not isinstance(meta, dict) or isinstance(meta.get("n_bins"), bool) or not isinstance(meta.get("n_bins"), int):
        return "no 'metadata' with 'n_bins'"
    calibration = report.get("calibration")
    regions = default_regions()
    if not isinstance(calibration, dict) or not all(isinstance(calibration.get(r), dict) for r in regions):
        return f"no 'calibration' for the regions {', '.join(regions)}"
    for region in regions:
        absent = [k for k in ("ece", "mce", "cece", "nll", "brier", "reliability") if k not in calibration[region]]
        if absent:
            return f"'calibration.{region}' lacks {', '.join(absent)}"
        bins = calibration[region]["reliability"]
        if not isinstance(bins, dict) or not all(isinstance(bins.get(k), list) for k in ("confidence", "accuracy", "count")):
            return f"'calibration.{region}.reliability' lacks the confidence, accuracy and count lists"
    segmentation = report.get("segmentation")
    if not isinstance(segmentation, dict) or not isinstance(segmentation.get("mean_foreground"), dict):
        return "no 'segmentation.mean_foreground'"
    absent = [k for k in ("dice", "hd95", "assd") if k not in segmentation["mean_foreground"]]
    return f"'segmentation.mean_foreground' lacks {', '.join(absent)}" if absent else ""


def _looks_like_export(record: Any) -> bool:
    return isinstance(record, dict) and "temperature_request" in record and "checkpoint" in record


def _floats(value: Any) -> Any:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats(v) for v in value]
    return value


def _export_info(predictions: Path) -> dict[str, Any]:
    """The export's own record (``{}`` when there is none); a DataError naming the file when
    ``export.json`` is not a JSON object (a list, a folder, unreadable)."""
    path = predictions / EXPORT_JSON
    if not path.exists():
        return {}
    if not path.is_file():
        raise DataError(f"{path}: is not a file; an export record is a JSON object (remove it or export again)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable export record ({exc})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}: not an export record (a JSON {type(record).__name__}, expected an object)")
    return record


def warn_if_other_manifest(export_info: dict[str, Any], manifest: Path, predictions: Path) -> str | None:
    """Warn (and return the message) when the export was made from another manifest than the
    one evaluated against: the cases may share ids and still be other images."""
    recorded = export_info.get("manifest")
    if not isinstance(recorded, str) or not recorded:
        return None
    if Path(recorded).expanduser().resolve() == Path(manifest).expanduser().resolve():
        return None
    message = (
        f"{predictions}: exported from the manifest {recorded}, evaluated against {Path(manifest).resolve()}; "
        "the labels are those of the second one (check that the cases are the same images)"
    )
    log.warning("warning: %s", message)
    return message
