"""``segcalib report``: one comparison of several evaluation reports (table + overlaid diagrams)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from segcalib.errors import DataError
from segcalib.reports.evaluation import _finite_json, read_report, summarise
from segcalib.reports.figures import Curve, reliability_png
from segcalib.reports.html import figure, fmt, page, table
from segcalib.reports.markdown import markdown_table
from segcalib.spatial.regions import default_regions, region_label
from segcalib.utils.files import write_text_atomic

COLUMNS = [
    ("dice_fg", "Dice fg", max),
    ("hd95", "HD95 mm", min),
    *((f"ece_{region}", f"ECE {region_label(region)}", min) for region in default_regions()),
    ("cece", "CECE", min),
    ("nll", "NLL", min),
    ("brier", "Brier", min),
    ("temperature", "T", None),
]


def find_reports(inputs: Sequence[str | Path]) -> list[Path]:
    """report.json files named directly, or found under folders (runs, evaluation folders)."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            matches = sorted(path.rglob("report.json"))
            if not matches:
                raise DataError(f"{path}: no report.json under this folder (run segcalib evaluate first)")
            found.extend(matches)
        else:
            raise DataError(f"{path}: no such report or folder")
    return found


def label_for(report: dict[str, Any], path: Path) -> str:
    """``run / report folder`` plus the temperature when one was applied."""
    meta = report["metadata"]
    name = f"{Path(meta['run']).name} / {path.parent.name}" if meta.get("run") else path.parent.name
    t = meta.get("temperature")
    method = (meta.get("calibrator") or {}).get("method")
    if method and method != "temperature":
        return name if method in path.parent.name else f"{name} ({method})"  # not twice
    return f"{name} (T={t:.3f})" if isinstance(t, (int, float)) and abs(t - 1.0) > 1e-9 else name


def compare(inputs: Sequence[str | Path], output: str | Path) -> dict[str, Any]:
    """Write comparison.json, comparison.html and comparison.md for the given reports."""
    output = Path(output)
    paths = find_reports(inputs)
    entries = []
    for path in paths:
        report = read_report(path)
        entries.append({"label": label_for(report, path), "path": str(path), "report": report, "summary": summarise(report)})
    bins = {int(e["report"]["metadata"]["n_bins"]) for e in entries}
    if len(bins) > 1:
        listing = ", ".join(f"{e['path']}: {e['report']['metadata']['n_bins']}" for e in entries)
        raise DataError(f"reports with different numbers of reliability bins cannot be overlaid ({listing}); "
                        "evaluate them with the same --bins")
    labels = [e["label"] for e in entries]
    for e in entries:  # make labels unique
        if labels.count(e["label"]) > 1:
            e["label"] = f"{e['label']} [{e['path']}]"
    comparison = {"reports": [{"label": e["label"], "path": e["path"], **e["summary"]} for e in entries]}
    output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output / "comparison.json", json.dumps(_finite_json(comparison), indent=1))
    write_text_atomic(output / "comparison.md", comparison_markdown(comparison["reports"]))
    write_text_atomic(output / "comparison.html", render_comparison(entries))
    return comparison


def comparison_markdown(rows: Sequence[dict[str, Any]], first: str = "label", first_header: str = "run") -> str:
    """comparison.md: one row per report, the headline columns."""
    body = [[str(row[first])] + [fmt(row.get(key)) for key, _, _ in COLUMNS] for row in rows]
    return "\n".join(markdown_table([first_header] + [title for _, title, _ in COLUMNS], body)) + "\n"


def render_comparison(entries: Sequence[dict[str, Any]]) -> str:
    rows = [[e["label"]] + [e["summary"].get(k) for k, _, _ in COLUMNS] for e in entries]
    classes = [[""] * (len(COLUMNS) + 1) for _ in rows]
    for j, (key, _, best) in enumerate(COLUMNS, start=1):
        values = [e["summary"].get(key) for e in entries]
        finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        if best is None or not finite:
            continue
        target = best(finite)
        for i, v in enumerate(values):
            if v == target:
                classes[i][j] = "best"
    parts = ["<h1>segcalib comparison</h1>", table(["run"] + [t for _, t, _ in COLUMNS], rows, classes)]
    parts.append('<p class="note">Best value per column highlighted. ECE pooled over all voxels of all cases; '
                 "regions defined on the ground truth.</p>")
    parts.append("<h2>Reliability diagrams</h2><div class=\"figs\">")
    n_bins = entries[0]["report"]["metadata"]["n_bins"] if entries else 15
    regions = [r for r in default_regions() if all(r in e["report"]["calibration"] for e in entries)]
    for region in regions:
        curves = [Curve(e["label"], **_bins(e["report"]["calibration"][region]["reliability"])) for e in entries]
        parts.append(figure(reliability_png(curves, f"{region} voxels", n_bins), f"{region} voxels"))
    parts.append("</div><h2>Reports</h2><ul>")
    parts.extend(f"<li>{fmt(e['label'])}: {fmt(e['path'])}</li>" for e in entries)
    parts.append("</ul>")
    return page("segcalib comparison", "".join(parts))


def _bins(bins: dict[str, Any]) -> dict[str, Any]:
    return {"confidence": bins["confidence"], "accuracy": bins["accuracy"], "count": bins["count"]}
