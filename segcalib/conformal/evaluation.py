"""The conformal section of ``segcalib evaluate``: how the guaranteed masks did on labelled cases.

Per target (foreground class or their union) over the cases that contain it (absent ones are
counted, as at fit): the controlled test risk (mean 1 - recall for fnr and margin, mean
1 - precision for fdr), the other rate, and the mean mask size relative to the truth and to the
argmax mask; the inner mask's false discovery rate and size when the fit has one; per case the
same numbers. Masks are made exactly as ``conformal apply`` makes them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from segcalib.conformal.apply import check_classes, target_mask
from segcalib.conformal.record import read_record
from segcalib.conformal.targets import probabilities, targets, truth_of
from segcalib.data import read_volume
from segcalib.data.manifest import Case
from segcalib.predictions import check_geometry, open_predictions


def mask_scores(mask: np.ndarray, truth: np.ndarray, argmax: np.ndarray) -> dict[str, float]:
    """1 - recall, 1 - precision (0 for an empty mask) and sizes relative to truth and argmax."""
    size, true, hits, ref = int(mask.sum()), int(truth.sum()), int((mask & truth).sum()), int(argmax.sum())
    return {"fnr": 1 - hits / true if true else math.nan, "fdr": (size - hits) / size if size else 0.0,
            "size_vs_truth": size / true if true else math.nan, "size_vs_argmax": size / ref if ref else math.nan}


def _mean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def foreground_band(record: dict[str, Any], probs: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray | None, np.ndarray]:
    """The union-of-foreground target's ``(inner or None, outer)`` masks of one case from its
    probabilities ``(C, *spatial)`` (what the report's case views outline)."""
    union = [t for t in targets(probs, record["class_names"]) if t.index is None][0]
    row = {r["name"]: r for r in record["targets"]}[union.name]
    outer = target_mask(union, row, record["risk"], spacing)
    inner = target_mask(union, row["inner"], "fdr", spacing) if "inner" in row else None
    return inner, outer


def evaluate_conformal(conformal_dir: str | Path, predictions: str | Path, cases: Iterable[Case]) -> dict[str, Any]:
    """The conformal section for the labelled ``cases`` whose maps are in ``predictions``."""
    record = read_record(conformal_dir)
    folder = open_predictions(predictions)
    rows = {row["name"]: row for row in record["targets"]}
    per_case, scores = [], {name: {"outer": [], "inner": []} for name in rows}
    absent: dict[str, list[str]] = {name: [] for name in rows}
    for case in cases:
        label, header = read_volume(case.label, dtype=np.int64)
        pred = folder.read(case.case_id)
        check_geometry(pred, header)
        check_classes(pred, record, Path(conformal_dir), folder.metadata or {})
        label = label.reshape(pred.spatial_shape)
        entry: dict[str, Any] = {"case": case.case_id}
        for target in targets(probabilities(pred), record["class_names"]):
            truth = truth_of(label, target.index)
            if not truth.any():
                absent[target.name].append(case.case_id)
                continue
            row = rows[target.name]
            outer = mask_scores(target_mask(target, row, record["risk"], pred.spacing), truth, target.pred)
            scores[target.name]["outer"].append(outer)
            entry[target.name] = outer
            if "inner" in row:
                inner = mask_scores(target_mask(target, row["inner"], "fdr", pred.spacing), truth, target.pred)
                scores[target.name]["inner"].append(inner)
                entry[target.name] = {**outer, "inner": inner}
        per_case.append(entry)
    controlled = "fdr" if record["risk"] == "fdr" else "fnr"
    summary = {}
    for name, by in scores.items():
        outer = by["outer"]
        summary[name] = {
            "n": len(outer), "absent": absent[name], "alpha": record["alpha"],
            "test_risk": _mean([s[controlled] for s in outer]),
            **{key: _mean([s[key] for s in outer]) for key in ("fnr", "fdr", "size_vs_truth", "size_vs_argmax")},
        }
        if by["inner"]:
            summary[name]["inner"] = {"alpha": record["inner_alpha"], **{
                key: _mean([s[key] for s in by["inner"]]) for key in ("fdr", "fnr", "size_vs_truth", "size_vs_argmax")}}
    return {"conformal": str(Path(conformal_dir).resolve()), "risk": record["risk"], "alpha": record["alpha"],
            "delta": record["delta"], "targets": summary, "cases": per_case}
