"""Streaming calibration metrics per region of the ground truth (SPEC §3): :class:`CalibrationMetric`.

The state is a few fixed-size float64 tensors of sufficient statistics per (region, class, bin)
-- never a list of voxels -- so batches, volumes and processes combine by summation (dataset-level
pooling, SPEC's default). Per-case values (a few floats per case) are kept beside them, including
the "MedIA" convention: per-volume ECE on ground-truth foreground voxels, averaged over volumes.
:meth:`CalibrationMetric.compute` returns a typed :class:`CalibrationResult` (tensors); the JSON
form of a report is made in :mod:`segcalib.reports`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from segcalib.metrics.inputs import INCLUDE_BACKGROUND

from segcalib.metrics.calibration_functional import (
    calibration_arg_validation,
    calibration_tensor_validation,
    calibration_update,
    classwise_ece_from_bins,
    ece_from_bins,
    evaluated_classes,
    mce_from_bins,
)
from segcalib.metrics.state import SummableState
from segcalib.spatial.regions import DEFAULT_BOUNDARY_MM, FOREGROUND, default_regions
from segcalib.spatial.spacing import BatchSpacingLike
from segcalib.utils.distributed import gather_objects, is_distributed

DEFAULT_REGIONS = default_regions()


@dataclass(frozen=True)
class RegionCalibration:
    """Pooled calibration of one region (float64 CPU tensors; NaN where the region is empty).

    ``top_bins`` ``(M, 3)``: count, sum of confidence, sum of correct per bin;
    ``classwise_bins`` ``(C, M, 3)``: count, sum of ``p_k``, sum of ``[y == k]`` per class and bin.
    """

    ece: float
    mce: float
    cece: float
    cece_per_class: torch.Tensor
    nll: float
    brier: float
    n_voxels: int
    top_bins: torch.Tensor
    classwise_bins: torch.Tensor

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


@dataclass(frozen=True)
class CaseCalibration:
    """One case's ECE, CECE and voxel count per region."""

    case_id: Any
    ece: dict[str, float]
    cece: dict[str, float]
    n_voxels: dict[str, int]


@dataclass(frozen=True)
class CalibrationResult:
    """What :meth:`CalibrationMetric.compute` returns: ``result[region]`` is a
    :class:`RegionCalibration`; ``per_case`` and the MedIA foreground ECE (mean over volumes with
    foreground of the per-volume foreground ECE) when the metric keeps cases."""

    regions: dict[str, RegionCalibration]
    per_case: list[CaseCalibration] | None = None
    media_foreground_ece: float | None = None

    def __getitem__(self, region: str) -> RegionCalibration:
        return self.regions[region]


def _region_result(top: torch.Tensor, classwise: torch.Tensor, scores: torch.Tensor, include_background: bool):
    per_class = classwise_ece_from_bins(classwise)
    voxels = scores[0]
    return RegionCalibration(
        ece=float(ece_from_bins(top)),
        mce=float(mce_from_bins(top)),
        cece=float(per_class[evaluated_classes(classwise.shape[0], include_background)].mean()),
        cece_per_class=per_class,
        nll=float(scores[1] / voxels),
        brier=float(scores[2] / voxels),
        n_voxels=int(voxels),
        top_bins=top,
        classwise_bins=classwise,
    )


class CalibrationMetric(SummableState):
    """Streaming calibration metrics per region: ECE, MCE, CECE, NLL, Brier, reliability bins.

    Example:
        >>> metric = CalibrationMetric(num_classes=3)
        >>> for probs, target, spacing in loader:      # probs (B, C, *S), target (B, *S)
        ...     metric.update(probs, target, spacing=spacing)
        >>> result = metric.compute()                 # synced over processes under torch.distributed
        >>> result["foreground"].ece

    Args:
        num_classes: number of classes ``C`` (background included).
        n_bins: number of equal-width confidence bins ``M`` (at most 10,000).
        regions: names of the regions to evaluate (every registered region by default; see
            :mod:`segcalib.spatial.regions`).
        boundary_mm: half-width in mm of the ``boundary`` band.
        include_background: whether CECE averages over class 0 too.
        per_case: keep per-case ECE / CECE / voxel counts and the MedIA foreground ECE.
        ignore_index: label of voxels to leave out everywhere (``None``: none).
        nll_eps: floor on ``p_y`` inside the NLL's log (a probability of exactly 0 would give inf).
        validate_args: check value ranges of the inputs (on a GPU: one host sync per ``update``;
            ``False`` leaves ``update`` without any wait for the device but the boundary band's).
    """

    def __init__(
        self,
        num_classes: int,
        n_bins: int = 15,
        regions: Sequence[str] = DEFAULT_REGIONS,
        boundary_mm: float = DEFAULT_BOUNDARY_MM,
        include_background: bool = INCLUDE_BACKGROUND,
        per_case: bool = True,
        ignore_index: int | None = None,
        nll_eps: float = 1e-12,
        validate_args: bool = True,
    ) -> None:
        super().__init__()
        regions = tuple(regions)
        calibration_arg_validation(num_classes, n_bins, regions, boundary_mm, include_background)
        self.num_classes = num_classes
        self.n_bins = n_bins
        self.regions = regions
        self.boundary_mm = float(boundary_mm)
        self.include_background = include_background
        self.per_case = per_case
        self.ignore_index = ignore_index
        self.nll_eps = nll_eps
        self.validate_args = validate_args
        n_regions = len(regions)
        # sufficient statistics, summed over batches, volumes and processes
        self.add_state("top_stats", (n_regions, n_bins, 3))  # count, sum confidence, sum correct
        self.add_state("classwise_stats", (n_regions, num_classes, n_bins, 3))  # count, sum p_k, sum [y==k]
        self.add_state("score_stats", (n_regions, 3))  # voxels, sum NLL, sum Brier
        self._records: list[tuple[Any, torch.Tensor | list[float]]] = []
        self._n_cases = 0

    def config(self) -> dict[str, Any]:
        """The constructor's arguments."""
        return {
            "num_classes": self.num_classes,
            "n_bins": self.n_bins,
            "regions": list(self.regions),
            "boundary_mm": self.boundary_mm,
            "include_background": self.include_background,
            "per_case": self.per_case,
            "ignore_index": self.ignore_index,
            "nll_eps": self.nll_eps,
            "validate_args": self.validate_args,
        }

    @torch.no_grad()
    def update(
        self,
        probs: torch.Tensor,
        target: torch.Tensor,
        spacing: BatchSpacingLike = None,
        case_ids: Sequence[Any] | None = None,
    ) -> None:
        """Add a batch of cases.

        Args:
            probs: ``(B, C, *spatial)`` probabilities (float16/32/64, 2D or 3D), any device.
            target: ``(B, *spatial)`` or ``(B, 1, *spatial)`` integer labels.
            spacing: mm per voxel in the tensor's axis order: shared by the batch, or one per
                case; ``None`` = 1 mm.
            case_ids: optional identifiers of the ``B`` cases for the per-case records
                (default: a running index in this process).
        """
        target = calibration_tensor_validation(probs, target, self.num_classes)
        if case_ids is not None and len(case_ids) != probs.shape[0]:
            raise ValueError(f"{len(case_ids)} case_ids for a batch of {probs.shape[0]}")
        if probs.device != self.device:
            self.to(probs.device)
        stats = calibration_update(
            probs,
            target,
            n_bins=self.n_bins,
            regions=self.regions,
            spacing=spacing,
            boundary_mm=self.boundary_mm,
            ignore_index=self.ignore_index,
            nll_eps=self.nll_eps,
            validate_args=self.validate_args,
        )
        top, classwise, scores = stats["top"], stats["classwise"], stats["scores"]  # (B, R, ...)
        self.add_to_state({"top_stats": top.sum(0), "classwise_stats": classwise.sum(0), "score_stats": scores.sum(0)})
        batch = probs.shape[0]
        if self.per_case:
            evaluated = evaluated_classes(self.num_classes, self.include_background)
            values = torch.cat(
                [ece_from_bins(top), classwise_ece_from_bins(classwise)[..., evaluated].mean(-1), scores[..., 0]], -1
            )  # (B, 3R), kept on the device until compute()
            for i in range(batch):
                self._records.append((case_ids[i] if case_ids is not None else self._n_cases + i, values[i]))
        self._n_cases += batch

    def merge(self, other: CalibrationMetric) -> CalibrationMetric:
        """Add another metric's state and per-case records to this one (returns ``self``)."""
        if not isinstance(other, CalibrationMetric) or _what_it_measures(other) != _what_it_measures(self):
            raise ValueError("can only merge CalibrationMetric objects with the same configuration")
        self.merge_state(other)
        self._records.extend(other._records)
        self._n_cases += other._n_cases
        return self

    def reset(self) -> None:
        """Zero the state and forget the per-case records."""
        self.reset_state()
        self._records = []
        self._n_cases = 0

    def _materialized_records(self) -> list[tuple[Any, list[float]]]:
        """Per-case records as Python floats (one device-to-host copy for all of them)."""
        pending = [i for i, (_, v) in enumerate(self._records) if torch.is_tensor(v)]
        if pending:
            values = torch.stack([self._records[i][1].to(self.device) for i in pending]).cpu().tolist()
            for i, vals in zip(pending, values):
                self._records[i] = (self._records[i][0], vals)
        return list(self._records)  # type: ignore[arg-type]

    def _global_view(self) -> tuple[dict[str, torch.Tensor], list[tuple[Any, list[float]]]]:
        """State and records over every process (summed copies; the local state is untouched).
        Under torch.distributed every rank must call :meth:`compute`."""
        records = self._materialized_records()
        if not is_distributed():
            return self.state_tensors(), records
        state = self.reduced_state_copy()
        records = [rec for part in gather_objects(records) for rec in part]
        return state, records

    def compute(self) -> CalibrationResult:
        """The pooled metrics per region (over every process), plus per-case records.

        Empty regions give NaN and ``n_voxels`` 0. Under torch.distributed, call it on every rank.
        """
        state, records = self._global_view()
        top, classwise, scores = (state[k].cpu() for k in ("top_stats", "classwise_stats", "score_stats"))
        regions = {
            name: _region_result(top[r], classwise[r], scores[r], self.include_background)
            for r, name in enumerate(self.regions)
        }
        if not self.per_case:
            return CalibrationResult(regions)
        per_case = [self._case_result(case_id, values) for case_id, values in records]
        media = None
        if FOREGROUND in self.regions:
            values = [c.ece[FOREGROUND] for c in per_case if not math.isnan(c.ece[FOREGROUND])]
            media = sum(values) / len(values) if values else math.nan
        return CalibrationResult(regions, per_case, media)

    def _case_result(self, case_id: Any, values: list[float]) -> CaseCalibration:
        r = len(self.regions)
        return CaseCalibration(
            case_id=case_id,
            ece=dict(zip(self.regions, values[:r])),
            cece=dict(zip(self.regions, values[r : 2 * r])),
            n_voxels={name: int(v) for name, v in zip(self.regions, values[2 * r :])},
        )


def _what_it_measures(metric: CalibrationMetric) -> dict[str, Any]:
    """The configuration that must agree for two states to add up (input checking aside)."""
    return {k: v for k, v in metric.config().items() if k != "validate_args"}
