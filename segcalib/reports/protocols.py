"""Evaluation protocols: presets that reproduce the way a tool or a paper computes its table.

A protocol only changes what is computed and how it is named, never the data: the bins and the
classes of the pooled calibration, plus a ``protocol`` section of the report with the values under
the names of their source. ``segcalib evaluate --protocol NAME``; the sources are in docs/metrics.md.

- ``segcalib``: SPEC §3/§4 (dataset-level pooling, 15 equal-width bins, CECE over all classes,
  Dice and MONAI's HD95 in mm with NaN/inf for absent classes). No extra section values.
- ``monai``: MONAI 1.6 ``CalibrationErrorMetric`` (per image and class, 20 bins,
  ``include_background=False``, mean over images and classes leaving NaN out).
- ``media2023``: the seed papers (Murugesan et al., MedIA 2023, code Bala93/MarginLoss): ECE and
  CECE over the ground-truth-foreground voxels of each volume (15 bins), averaged over volumes;
  Dice and HD95 as ``medpy.metric.binary`` computes them, without spacing (voxels), with the
  seed convention for absent classes (absent from the ground truth: Dice 1, HD95 0; predicted
  empty: Dice 0, HD95 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from segcalib.errors import ConfigError
from segcalib.metrics.medpy_compat import per_class_scores
from segcalib.metrics.monai_calibration import monai_calibration_error
from segcalib.spatial.regions import FOREGROUND

CaseFn = Callable[[torch.Tensor, torch.Tensor, int], dict[str, list[float]]]
SummaryFn = Callable[[list[dict[str, Any]]], dict[str, Any]]


@dataclass(frozen=True)
class Protocol:
    """One preset: pooled-calibration settings, per-case values and their summary."""

    name: str
    title: str
    source: str
    n_bins: int
    include_background: bool
    case_values: CaseFn
    summary: SummaryFn


def _nothing(probs: torch.Tensor, label: torch.Tensor, num_classes: int) -> dict[str, list[float]]:
    return {}


def _no_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {}


def _monai_case(probs: torch.Tensor, label: torch.Tensor, num_classes: int) -> dict[str, list[float]]:
    return {"monai_ece": monai_calibration_error(probs, label, 20, include_background=False)[0].tolist()}


def _mean(values: list[float]) -> tuple[float, int]:
    """Mean without NaN and the number of NaN left out."""
    array = np.asarray(values, dtype=np.float64)
    kept = array[~np.isnan(array)]
    return (float(kept.mean()) if kept.size else math.nan), int(array.size - kept.size)


def _monai_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    per_class = np.array([r["protocol"]["monai_ece"] for r in rows], dtype=np.float64).reshape(len(rows), -1)
    value, n_nan = _mean(per_class.ravel().tolist())
    return {
        "monai_ece": value,
        "monai_ece_per_class": [_mean(per_class[:, k].tolist())[0] for k in range(per_class.shape[1])],
        "monai_ece_n_nan": n_nan,
    }


def _media_case(probs: torch.Tensor, label: torch.Tensor, num_classes: int) -> dict[str, list[float]]:
    scores = per_class_scores(probs, label, num_classes, spacing=None, include_background=False, convention="seed")
    return {"medpy_dice": scores["dice"][0].tolist(), "medpy_hd95_voxels": scores["hd95"][0].tolist()}


def _media_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("ece", "cece"):
        values = [r.get("calibration", {}).get(key, {}).get(FOREGROUND, math.nan) for r in rows]
        out[f"{key}_foreground_per_volume"], out[f"{key}_foreground_n_nan"] = _mean(values)
    for key in ("medpy_dice", "medpy_hd95_voxels"):
        per_class = np.array([r["protocol"][key] for r in rows], dtype=np.float64).reshape(len(rows), -1)
        out[key] = _mean(per_class.mean(1).tolist())[0]  # classes averaged per volume, then volumes
        out[f"{key}_per_class"] = [_mean(per_class[:, k].tolist())[0] for k in range(per_class.shape[1])]
    return out


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("segcalib", "segcalib (SPEC §3-§4): dataset-level pooling, 15 equal-width bins",
                 "segcalib SPEC; Guo et al. ICML 2017 (ECE); MONAI compute_hausdorff_distance (HD95)",
                 15, True, _nothing, _no_summary),
        Protocol("monai", "MONAI CalibrationErrorMetric: per image and class, 20 bins, no background",
                 "MONAI 1.6 monai.metrics.CalibrationErrorMetric (num_bins=20, include_background=False, mean)",
                 20, False, _monai_case, _monai_summary),
        Protocol("media2023", "seed papers: per-volume foreground ECE/CECE (15 bins), medpy Dice/HD95 in voxels",
                 "Murugesan et al., Medical Image Analysis 87, 2023 (code Bala93/MarginLoss); medpy.metric.binary dc, hd95",
                 15, True, _media_case, _media_summary),
    )
}
DEFAULT_PROTOCOL = "segcalib"


def get_protocol(name: str) -> Protocol:
    """The protocol ``name`` (ConfigError listing the known ones otherwise)."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ConfigError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}") from None


def list_protocols() -> list[str]:
    return list(PROTOCOLS)


def protocol_section(protocol: Protocol, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's ``protocol`` section: which preset, its source and its values."""
    return {"name": protocol.name, "title": protocol.title, "source": protocol.source, "values": protocol.summary(rows)}
