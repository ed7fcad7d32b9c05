"""``segcalib evaluate``: every metric of :mod:`segcalib.metrics` for a folder of exported maps.

For each labelled case of the split, its map is read from the prediction folder, whatever its
registered format (:mod:`segcalib.predictions`: a segcalib export's ``<case>_probs``, an nnU-Net
``--save_probabilities`` folder, 4D NIfTI maps; it must lie on the label's voxels and have the
manifest's classes), then calibration statistics per region (pooled over
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
from segcalib.data import load_manifest
from segcalib.data.manifest import SPLIT_SEED, Case
from segcalib.errors import ConfigError, DataError
from segcalib.metrics import AdaptiveCalibrationError, CalibrationMetric
from segcalib.metrics.registry import BINNINGS
from segcalib.predictions import match_cases, open_predictions
from segcalib.predictions.layout import EXPORT_JSON
from segcalib.reports.calibration_json import calibration_json
from segcalib.reports.case_rows import CaseInputs, evaluate_case, read_case
from segcalib.reports.protocols import DEFAULT_PROTOCOL, get_protocol, protocol_section
from segcalib.reports.report_json import finite_json, read_report
from segcalib.reports.uncertainty_report import UncertaintyReport, available_maps
from segcalib.spatial.regions import ALL, DEFAULT_BOUNDARY_MM, default_regions, region_description
from segcalib.utils.devices import select_device
from segcalib.utils.distributed import gather_objects, is_main_process, rank, world_size
from segcalib.utils.overlap import overlapped
from segcalib.utils.files import check_output_folder, write_text_atomic

log = logging.getLogger("segcalib")
_finite_json = finite_json  # the name compare.py imports
__all__ = ["evaluate", "read_report", "segmentation_summary", "summarise", "warn_if_other_manifest"]


def evaluate(
    predictions: str | Path,
    manifest_path: str | Path,
    output: str | Path,
    split: str = "test",
    n_bins: int | None = None,
    boundary_mm: float | None = None,
    device: str | torch.device | None = None,
    write_html: bool = True,
    split_seed: int | None = None,
    protocol: str = DEFAULT_PROTOCOL,
    binning: str = "equal-width",
    uncertainty: bool = True,
    format: str = "auto",
    channel_axis: str = "last",
    input: str = "auto",
    conformal: str | Path | None = None,
    overlap: bool = True,
) -> dict[str, Any]:
    """Compute the report of ``predictions`` against the manifest's ground truth; write it to ``output``.

    ``split_seed`` (for manifests without explicit splits) and ``boundary_mm`` (the boundary
    band's half-width): by default the ones the export recorded, so that the cases and the band
    are the ones the export used. Voxels of the manifest's ``ignore_label`` (nnU-Net's ``"ignore"``)
    count in no metric: the calibration and uncertainty statistics leave them out, and Dice and the
    surface distances see them as background in both masks (so in no foreground class's Dice). ``protocol`` (:mod:`segcalib.reports.protocols`) sets the
    default ``n_bins`` and the classes of CECE and adds its own values; ``binning="equal-mass"``
    adds the pooled top-label equal-mass ECE; ``uncertainty`` the uncertainty-quality section;
    ``conformal`` (a ``segcalib conformal fit`` folder) the conformal section (test risk and mask
    sizes of the guaranteed masks, :mod:`segcalib.conformal.evaluation`).
    ``format``, ``channel_axis``, ``input``: how to read the folder, as ``segcalib calibrate`` reads
    it (:func:`segcalib.predictions.open_predictions`); where a case has both probabilities and
    logits (an export with ``--logits``), the probabilities are evaluated; logits alone go through a
    softmax.
    ``overlap``: read case i+1 on this thread while a worker computes the metrics of case i
    (:func:`segcalib.utils.overlap.overlapped`); the report is the same either way.
    """
    preset = get_protocol(protocol)
    if binning not in BINNINGS:
        raise ConfigError(f"unknown binning {binning!r}; known: {', '.join(BINNINGS)}")
    n_bins = preset.n_bins if n_bins is None else n_bins
    predictions, output = Path(predictions), check_output_folder(output, "report folder")  # before any work
    if not predictions.is_dir():
        raise DataError(f"{predictions}: predictions folder does not exist")
    device = select_device(device)
    export_info = _export_info(predictions)
    folder = open_predictions(predictions, format=format, channel_axis=channel_axis, input=input, prefer="probs")
    if split_seed is None:
        split_seed = int(export_info.get("split_seed", SPLIT_SEED))
    if boundary_mm is None:  # the band the export's calibration was fitted on: one setting
        boundary_mm = float(export_info.get("boundary_mm", DEFAULT_BOUNDARY_MM))
    manifest = load_manifest(manifest_path, split_seed=split_seed)
    warn_if_other_manifest(export_info, manifest.path, predictions)
    cases = manifest.labelled(split)
    num_classes = manifest.num_classes
    match_cases(folder, cases)  # every labelled case has its map, named in one message otherwise
    for case in cases:  # before any voxel is read: every map has the manifest's classes
        folder.class_count(case.case_id, expected=num_classes, by=f"the manifest {manifest.path}")
    started = time.time()

    regions = default_regions()
    if manifest.ignore_label is not None and preset.name != DEFAULT_PROTOCOL:
        raise ConfigError(f"--protocol {preset.name}: its per-case values cannot leave out nnU-Net's ignore label "
                          f"({manifest.ignore_label} in {manifest.path}); use the default protocol {DEFAULT_PROTOCOL}")
    metric = CalibrationMetric(
        num_classes, n_bins=n_bins, regions=regions, boundary_mm=boundary_mm, include_background=preset.include_background,
        ignore_index=manifest.ignore_label,
    )
    equal_mass = AdaptiveCalibrationError(num_classes, n_bins, mode="top") if binning == "equal-mass" else None
    maps: tuple[str, ...] = ()
    if uncertainty and cases:  # the exported ensemble maps the first case has, then the computed ones
        maps = available_maps(predictions, cases[0].case_id)
    uncertain = UncertaintyReport(maps, num_classes, regions, boundary_mm) if maps else None
    rows, views = [], {}
    band_record = None
    if conformal is not None and write_html:  # the case views outline the conformal band
        from segcalib.conformal.record import read_record as read_conformal

        band_record = read_conformal(conformal)

    def read(case: Case) -> CaseInputs:
        return read_case(case, folder, num_classes, device, manifest.ignore_label)

    def finish(case: Case, inputs: CaseInputs) -> None:
        row, view = evaluate_case(case, folder, num_classes, metric, device, preset, uncertain, write_html,
                                  equal_mass, band_record, inputs=inputs)
        rows.append(row)
        if view is not None:
            views[case.case_id] = view

    # case i+1 is read (decompressed, checked, moved to the device) while the metrics of case i run
    overlapped(cases[rank() :: world_size()], read, finish, enabled=overlap, device=device)
    rows = [r for part in gather_objects(rows) for r in part]
    if write_html:
        views = {k: v for part in gather_objects(views) for k, v in part.items()}
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
            "prediction_format": folder.format,
            "manifest": str(manifest.path.resolve()),
            "split": split,
            "run": export_info.get("run"),
            "model": export_info.get("model"),
            "loss": export_info.get("loss"),
            "checkpoint": export_info.get("checkpoint"),
            "checkpoint_epoch": export_info.get("checkpoint_epoch"),
            "temperature": export_info.get("temperature"),
            "temperature_fit": export_info.get("temperature_fit"),
            "calibrator": export_info.get("calibrator"),
            "members": len(export_info.get("members") or []) or None,
            "config_hash": export_info.get("config_hash"),
            "class_names": manifest.class_names,
            "ignore_label": manifest.ignore_label,
            "n_bins": n_bins,
            "binning": binning,
            "protocol": preset.name,
            "include_background": preset.include_background,
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
        "segmentation": segmentation_summary(rows, manifest.class_names),
        "protocol": protocol_section(preset, rows),
        "cases": rows,
        "counts": _counts(rows, num_classes),
    }
    if equal_mass is not None:
        report["calibration_equal_mass"] = {ALL: {"ece": float(equal_mass.compute()["ace"]), "n_bins": n_bins}}
    if uncertain is not None:
        report["uncertainty"] = uncertain.section(rows)
    if conformal is not None and is_main_process():
        from segcalib.conformal.evaluation import evaluate_conformal

        report["conformal"] = evaluate_conformal(conformal, predictions, cases)
    report["summary"] = summarise(report)
    if is_main_process():
        output.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output / "report.json", json.dumps(finite_json(report), indent=1))
        if write_html:
            from segcalib.reports.html import render_report

            write_text_atomic(output / "report.html", render_report(report, views))
    return report


# -- summaries ---------------------------------------------------------------------------------


def segmentation_summary(rows: list[dict], class_names: list[str]) -> dict[str, Any]:
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
    section = report.get("protocol") or {}
    out["protocol"] = section.get("name", DEFAULT_PROTOCOL)
    out.update({k: v for k, v in (section.get("values") or {}).items() if isinstance(v, (int, float))})
    for name, by_region in ((report.get("uncertainty") or {}).get("metrics") or {}).items():
        out[f"aurc_{name}"] = by_region.get(ALL, {}).get("aurc")
    return out


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
