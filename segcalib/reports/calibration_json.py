"""JSON form of a :class:`segcalib.metrics.CalibrationResult` (what ``report.json`` holds)."""

from __future__ import annotations

from typing import Any

import torch

from segcalib.metrics.calibration import CalibrationResult, CaseCalibration, RegionCalibration
from segcalib.spatial.regions import FOREGROUND


def region_json(region: RegionCalibration) -> dict[str, Any]:
    """``{"ece", "mce", "cece", "cece_per_class", "nll", "brier", "n_voxels", "reliability":
    {"confidence", "accuracy", "count"}, "classwise_reliability": [{"confidence", "frequency",
    "count"} per class]}`` (NaN where a bin or the region is empty)."""
    top, classwise = region.top_bins, region.classwise_bins
    count = top[:, 0]
    cls_count = classwise[..., 0]
    return {
        "ece": region.ece,
        "mce": region.mce,
        "cece": region.cece,
        "cece_per_class": region.cece_per_class.tolist(),
        "nll": region.nll,
        "brier": region.brier,
        "n_voxels": region.n_voxels,
        "reliability": {
            "confidence": (top[:, 1] / count).tolist(),
            "accuracy": (top[:, 2] / count).tolist(),
            "count": _ints(count),
        },
        "classwise_reliability": [
            {
                "confidence": (classwise[k, :, 1] / cls_count[k]).tolist(),
                "frequency": (classwise[k, :, 2] / cls_count[k]).tolist(),
                "count": _ints(cls_count[k]),
            }
            for k in range(classwise.shape[0])
        ],
    }


def case_json(case: CaseCalibration) -> dict[str, Any]:
    """``{"case_id", "ece": {region}, "cece": {region}, "n_voxels": {region}[, "foreground_ece"]}``."""
    out = {"case_id": case.case_id, "ece": case.ece, "cece": case.cece, "n_voxels": case.n_voxels}
    if FOREGROUND in case.ece:
        out["foreground_ece"] = case.ece[FOREGROUND]
    return out


def calibration_json(result: CalibrationResult) -> dict[str, Any]:
    """``{region: region_json}`` plus ``"per_case"`` and ``"media_foreground_ece"`` when kept."""
    out: dict[str, Any] = {name: region_json(region) for name, region in result.regions.items()}
    if result.per_case is not None:
        out["per_case"] = [case_json(c) for c in result.per_case]
        if result.media_foreground_ece is not None:
            out["media_foreground_ece"] = result.media_foreground_ece
    return out


def _ints(values: torch.Tensor) -> list[int]:
    return [int(v) for v in values.tolist()]
