"""The report's uncertainty section: does each uncertainty map point at the errors?

Maps: ``entropy``, ``mutual_info`` and ``expected_entropy`` read from ``<case>_<map>.nii.gz`` when
the export wrote them (ensembles, TTA, MC dropout); otherwise the predictive ``entropy`` of the
probabilities; ``one_minus_max`` (``1 - max_k p_k``) always. For each map and each region of the
evaluation (the region registry's masks, on the ground truth) and pooled over all cases, the
streamed :class:`~segcalib.metrics.uncertainty.UncertaintyMetric` (AURC with its bound, E-AURC,
risk-coverage curve, AUROC, UEO best and at a fixed threshold, QU-BraTS per class); per case the
mean uncertainty over the voxels that the prediction or the ground truth calls foreground, and its
correlation with the case's mean foreground Dice.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from segcalib.data import VolumeHeader, read_volume
from segcalib.errors import DataError
from segcalib.metrics.uncertainty import (
    UncertaintyMetric,
    foreground_union,
    max_uncertainty,
    uncertainty_dice_correlation,
)
from segcalib.predictions.layout import ENSEMBLE_MAPS, map_path
from segcalib.spatial.regions import RegionContext, region_mask

EXPORTED_MAPS = ENSEMBLE_MAPS  # the export's names for ensembles, TTA and MC dropout
COMPUTED_MAPS = ("entropy", "one_minus_max")
CURVE_POINTS = 200  # risk-coverage points kept in report.json


def available_maps(predictions: Path, case_id: str) -> tuple[str, ...]:
    """The maps evaluated: exported ones found for ``case_id`` (the first case), then the computed."""
    exported = [m for m in EXPORTED_MAPS if map_path(predictions, case_id, m).exists()]
    return tuple(dict.fromkeys(exported + list(COMPUTED_MAPS)))


def uncertainty_maps(
    maps: Sequence[str], probs: torch.Tensor, case_id: str, predictions: Path, header: VolumeHeader
) -> dict[str, torch.Tensor]:
    """``{map: (1, *spatial) float32}`` on the probabilities' device; exported maps must exist for
    every case once the first case had them, and match the label's grid."""
    out: dict[str, torch.Tensor] = {}
    for name in maps:
        path = map_path(predictions, case_id, name) if name in EXPORTED_MAPS else None
        if path is not None and path.exists():
            array, map_header = read_volume(path, dtype=np.float32)
            if array.shape != tuple(header.shape[:3]) or not np.allclose(map_header.affine, header.affine, atol=1e-4):
                raise DataError(f"case {case_id}: {path} has another grid than the label")
            if not np.isfinite(array).all():
                raise DataError(f"case {case_id}: {path} holds NaN or infinite values")
            out[name] = torch.from_numpy(array).to(probs.device).unsqueeze(0).clamp_(min=0)
        elif name == "entropy":
            out[name] = torch.special.entr(probs).sum(1)
        elif name == "one_minus_max":
            out[name] = 1.0 - probs.amax(1)
        else:
            raise DataError(f"case {case_id}: no {path} (the first case had one; export every case the same way)")
    return out


class UncertaintyReport:
    """Streamed uncertainty metrics per (map, region) and per-case mean uncertainties."""

    def __init__(self, maps: Sequence[str], num_classes: int, regions: Sequence[str], boundary_mm: float) -> None:
        self.maps, self.regions = tuple(maps), tuple(regions)
        self.num_classes, self.boundary_mm = num_classes, boundary_mm
        self.metrics = {
            (m, r): UncertaintyMetric(num_classes, (0.0, max_uncertainty(m, num_classes)), include_background=False)
            for m in self.maps
            for r in self.regions
        }

    @torch.no_grad()
    def update(
        self, maps: dict[str, torch.Tensor], pred: torch.Tensor, label: torch.Tensor, spacing: Sequence[float],
        valid: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Add one case (``pred``, ``label`` ``(1, *spatial)``; ``valid``: the voxels that count, the
        others being nnU-Net's ignore label); returns its mean uncertainty per map."""
        context = RegionContext(label, [tuple(spacing)], self.num_classes, self.boundary_mm)
        masks = {r: region_mask(r, context) for r in self.regions}
        if valid is not None:
            masks = {r: valid if m is None else m & valid for r, m in masks.items()}
        union = foreground_union(pred, label)
        means = {}
        for name, values in maps.items():
            for region, mask in masks.items():
                metric = self.metrics[(name, region)]
                if metric.device != values.device:  # on the evaluation's device (NCCL reduces CUDA tensors)
                    metric.to(values.device)
                metric.update(values, pred, label, mask)
            means[name] = float(values[union].double().mean()) if bool(union.any()) else math.nan
        return means

    def section(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """``{"maps", "metrics": {map: {region: ...}}, "case_correlation": {map: ...}}`` for report.json."""
        metrics: dict[str, Any] = {}
        for (name, region), metric in self.metrics.items():
            values = metric.compute()
            values["risk_coverage"] = _thinned(metric.risk_coverage())
            metrics.setdefault(name, {})[region] = values
        dice = [_mean_dice(r) for r in rows]
        correlation = {
            name: uncertainty_dice_correlation([r["uncertainty"].get(name, math.nan) for r in rows], dice)
            for name in self.maps
        }
        return {
            "maps": list(self.maps),
            "value_ranges": {m: [0.0, max_uncertainty(m, self.num_classes)] for m in self.maps},
            "case_mean_over": "voxels that the prediction or the ground truth calls foreground",
            "metrics": metrics,
            "case_correlation": correlation,
        }


def _mean_dice(row: dict[str, Any]) -> float:
    values = [c["dice"] for c in row["classes"] if not math.isnan(c["dice"])]
    return float(np.mean(values)) if values else math.nan


def _thinned(curve: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """At most :data:`CURVE_POINTS` points of a risk-coverage curve (evenly spaced, the last kept)."""
    n = curve["coverage"].numel()
    index = torch.unique(torch.linspace(0, max(n - 1, 0), min(n, CURVE_POINTS)).round().long()) if n else torch.zeros(0, dtype=torch.long)
    return {key: curve[key][index].tolist() for key in ("coverage", "risk", "threshold")}
