"""Test and validation numbers of every candidate of one unit, in one pass over the cases, no maps written.

A candidate is a fitted calibrator (or ``none``: the raw maps, softmax of the exported logits). Each
case's logits are read once; every candidate's probabilities feed its own
:class:`~segcalib.metrics.CalibrationMetric` (pooled ECE, NLL, Brier of the ``all``, ``foreground`` and
``boundary`` ground-truth regions, per-case ECE) and its per-case Dice and surface distances per
foreground class -- computed only when its argmax differs from the raw one. The summary of each
candidate is made by :func:`segcalib.reports.evaluation.summarise`, the same function as
``segcalib evaluate``'s, so the numbers are those of evaluating written maps (tested).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch

from segcalib.calibrators import Calibrator
from segcalib.data import load_manifest
from segcalib.export.posthoc import _fit_item
from segcalib.metrics import CalibrationMetric, dice, surface_distances_per_class
from segcalib.predictions import match_cases, open_predictions
from segcalib.reports.calibration_json import calibration_json
from segcalib.reports.evaluation import segmentation_summary, summarise
from segcalib.spatial.regions import DEFAULT_BOUNDARY_MM, default_regions

from pipelines.study.cases import export_folder

CASE_KEYS = ("dice", "hd95")  # per class, per case, in the record


def score_split(
    run_dir: Path,
    manifest_path: Path,
    split: str,
    split_seed: int,
    candidates: Mapping[str, Calibrator | None],
    device: torch.device,
    boundary_mm: float = DEFAULT_BOUNDARY_MM,
    n_bins: int = 15,
) -> dict[str, dict[str, Any]]:
    """Per candidate: ``{"summary": evaluate's summary, "cases": [{"case", "dice": [..], "hd95": [..],
    "ece": {region}}]}`` on the labelled cases of ``split`` (maps from the run's logits export)."""
    manifest = load_manifest(manifest_path, split_seed=split_seed)
    num_classes = manifest.num_classes
    folder = open_predictions(export_folder(run_dir, split), format="segcalib", input="logits")
    cases = [case for case, _ in match_cases(folder, manifest.labelled(split))]
    regions = default_regions()
    metrics = {name: CalibrationMetric(num_classes, n_bins=n_bins, regions=regions, boundary_mm=boundary_mm)
               for name in candidates}
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in candidates}
    for case in cases:
        case_id, logits, target, spacing, _ = _fit_item(folder, case, num_classes, device, False)
        raw_pred = logits.argmax(dim=1)
        raw_classes = None
        for name, calibrator in candidates.items():
            if calibrator is None:
                probs = torch.softmax(logits, dim=1)
            else:
                probs = calibrator.transform(logits, spacing=[spacing])
            metrics[name].update(probs, target, spacing=[spacing], case_ids=[case_id])
            pred = probs.argmax(dim=1)
            del probs
            if torch.equal(pred, raw_pred):
                if raw_classes is None:
                    raw_classes = _classes(pred, target, num_classes, spacing)
                classes = raw_classes
            else:
                classes = _classes(pred, target, num_classes, spacing)
            rows[name].append({"case": case_id, "spacing": list(spacing), "classes": classes})
    out = {}
    for name in candidates:
        pooled = calibration_json(metrics[name].compute())
        report = {
            "calibration": {region: pooled[region] for region in regions},
            "media_foreground_ece": pooled.get("media_foreground_ece"),
            "segmentation": segmentation_summary(rows[name], manifest.class_names),
            "metadata": {},
        }
        per_case_ece = {r["case_id"]: r["ece"] for r in pooled.get("per_case", [])}
        out[name] = {
            "summary": {k: v for k, v in summarise(report).items() if k not in ("temperature", "protocol")},
            "cases": [{"case": r["case"], **{key: [c[key] for c in r["classes"]] for key in CASE_KEYS},
                       "ece": per_case_ece.get(r["case"], {})} for r in rows[name]],
        }
    return out


def _classes(pred: torch.Tensor, target: torch.Tensor, num_classes: int, spacing) -> list[dict[str, float]]:
    """Per foreground class: Dice and surface distances (evaluate's row format)."""
    per_class = dice(pred, target, num_classes, include_background=False)[0].tolist()
    distances = surface_distances_per_class(pred[0], target[0], num_classes, list(spacing), include_background=False)
    return [{"class": k, "dice": float(per_class[k - 1]), **{m: float(v) for m, v in d.items()}}
            for k, d in enumerate(distances, start=1)]


def finite_or_none(value: Any) -> Any:
    """JSON-safe, compact numbers: 7 significant digits, NaN becomes None, infinities the strings
    ``"inf"`` / ``"-inf"`` (a missed structure)."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return float(f"{value:.7g}")
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value
