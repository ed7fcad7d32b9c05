"""report.json on disk: NaN and inf as strings (JSON has neither), and the checks that a file read
back is a segcalib evaluation report (what ``compare`` and ``summarise`` rely on)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from segcalib.errors import DataError
from segcalib.spatial.regions import default_regions


def finite_json(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings "nan", "inf", "-inf" (read back with float())."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def read_report(path: str | Path) -> dict[str, Any]:
    """Load a report.json, turning the "nan"/"inf" strings back into floats; anything that is not
    a segcalib evaluation report (an export.json, ``{}``, ``[]``) is a DataError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a report.json")
    try:
        report = floats(json.loads(path.read_text(encoding="utf-8")))
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
    if not isinstance(calibration, dict) or not all(isinstance(calibration.get(r), dict) for r in default_regions()):
        return f"no 'calibration' for the regions {', '.join(default_regions())}"
    for region in default_regions():
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


def floats(value: Any) -> Any:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, dict):
        return {k: floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [floats(v) for v in value]
    return value
