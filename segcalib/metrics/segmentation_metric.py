"""Streaming segmentation metric: pooled Dice counts plus per-case Dice, HD, HD95, ASSD, HD95 in
voxels and normalised surface Dice, merged across batches and processes.

- Dice (SPEC §4): per class, ``(intersection, |P|, |G|)`` voxel counts summed over every case
  added (the pooled, dataset-level Dice) and Dice per case.
- Surface distances per case and class (:func:`segcalib.metrics.surface.surface_distances_per_class`):
  ``hd``, ``hd95`` (max of the two directed percentiles, MONAI) and ``assd`` in mm with the case's
  spacing; ``hd95_voxels`` the same HD95 with unit spacing (voxel units, as reported by papers
  that ignore spacing); ``nsd`` the normalised surface Dice at ``nsd_tolerance_mm``
  (:mod:`segcalib.metrics.nsd`, one tolerance or one per evaluated class).
- Empty classes (SPEC §4): absent from both prediction and ground truth -> NaN for every measure
  (left out of the means and counted in ``n_nan``); present in exactly one -> Dice 0, NSD 0 and
  distances inf (counted in ``n_inf``; a class mean with an inf is inf).

State: the float64 ``dice_counts`` ``(C, 3)`` (summed; all-reduced inside ``compute()``) and a list
of per-case rows (gathered from every process with ``all_gather_object`` inside ``compute()``,
in rank order). ``compute()`` leaves the local state as it was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from segcalib.metrics.inputs import INCLUDE_BACKGROUND, evaluated_classes, prediction_labels
from segcalib.metrics.nsd import normalized_surface_dice
from segcalib.metrics.overlap import dice_counts, dice_from_counts
from segcalib.metrics.state import SummableState
from segcalib.metrics.streaming import gathered_rows, summed_copy
from segcalib.metrics.surface import surface_distances_per_class
from segcalib.spatial.spacing import BatchSpacingLike, spacing_per_case

CASE_KEYS = ("dice", "hd", "hd95", "assd", "hd95_voxels", "nsd")


def _nanmean(values: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 leaving NaN out (NaN where nothing is left; an inf stays inf)."""
    ok = ~torch.isnan(values)
    total = torch.where(ok, values, torch.zeros_like(values)).sum(0)
    n = ok.sum(0)
    return torch.where(n > 0, total / n.clamp(min=1), torch.full_like(total, math.nan))


class SegmentationMetric(SummableState):
    """Dice, HD, HD95, ASSD, NSD per case and class, with pooled Dice counts.

    Args:
        num_classes: ``C`` (background included).
        include_background: evaluate class 0 too.
        nsd_tolerance_mm: NSD tolerance ``tau`` in mm, one for all classes or one per evaluated
            class.
        percentile: of ``hd95``.
    """

    def __init__(
        self,
        num_classes: int,
        include_background: bool = INCLUDE_BACKGROUND,
        nsd_tolerance_mm: float | Sequence[float] = 1.0,
        percentile: float = 95.0,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        self.num_classes = num_classes
        self.include_background = include_background
        self.classes = evaluated_classes(num_classes, include_background)
        if isinstance(nsd_tolerance_mm, (int, float)):
            taus = [float(nsd_tolerance_mm)] * len(self.classes)
        else:
            taus = [float(t) for t in nsd_tolerance_mm]
        if len(taus) != len(self.classes) or not all(math.isfinite(t) and t >= 0 for t in taus):
            raise ValueError(
                f"nsd_tolerance_mm must be one finite number >= 0 or one per evaluated class ({len(self.classes)}), "
                f"got {nsd_tolerance_mm!r}"
            )
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
        self.nsd_tolerance_mm = tuple(taus)
        self.percentile = float(percentile)
        self.add_state("dice_counts", (num_classes, 3))
        self._rows: list[tuple[Any, list[list[float]]]] = []
        self._n_cases = 0

    def _config(self) -> tuple[Any, ...]:
        return (self.num_classes, self.include_background, self.nsd_tolerance_mm, self.percentile)

    def _case_row(
        self, pred: torch.Tensor, truth: torch.Tensor, counts: torch.Tensor, spacing: tuple[float, ...]
    ) -> list[list[float]]:
        c, first = self.num_classes, self.classes[0]
        mm = surface_distances_per_class(pred, truth, c, spacing, self.include_background, self.percentile)
        vox = surface_distances_per_class(pred, truth, c, None, self.include_background, self.percentile)
        nsd = [
            normalized_surface_dice(pred == k, truth == k, tau, spacing)
            for k, tau in zip(self.classes, self.nsd_tolerance_mm)
        ]
        return [
            dice_from_counts(counts[first:]).tolist(),
            [d["hd"] for d in mm],
            [d["hd95"] for d in mm],
            [d["assd"] for d in mm],
            [d["hd95"] for d in vox],
            nsd,
        ]

    @torch.no_grad()
    def update(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        spacing: BatchSpacingLike = None,
        case_ids: Sequence[Any] | None = None,
    ) -> None:
        """Add a batch of cases.

        Args:
            pred: ``(B, C, *spatial)`` probabilities or one-hot (argmax over classes), or integer
                labels ``(B, *spatial)`` / ``(B, 1, *spatial)``; 2D or 3D.
            target: integer labels ``(B, *spatial)`` or ``(B, 1, *spatial)``.
            spacing: mm per voxel in the tensor's axis order, shared by the batch or one per case
                (``None`` = 1 mm).
            case_ids: identifiers of the ``B`` cases (default: a running index in this process).
        """
        labels, truth = prediction_labels(pred, target, self.num_classes)
        b = labels.shape[0]
        if case_ids is not None and len(case_ids) != b:
            raise ValueError(f"{len(case_ids)} case_ids for a batch of {b}")
        if labels.device != self.device:
            self.to(labels.device)
        spacings = spacing_per_case(spacing, b, labels.dim() - 1)
        counts = dice_counts(labels, truth, self.num_classes)
        self.add_to_state({"dice_counts": counts.sum(0)})
        for i in range(b):
            case_id = case_ids[i] if case_ids is not None else self._n_cases + i
            self._rows.append((case_id, self._case_row(labels[i], truth[i], counts[i], spacings[i])))
        self._n_cases += b

    def merge(self, other: SegmentationMetric) -> SegmentationMetric:
        """Add another metric's counts and per-case rows (returns ``self``)."""
        super().merge(other)
        self._rows.extend(other._rows)
        self._n_cases += other._n_cases
        return self

    def reset(self) -> None:
        super().reset()
        self._rows = []
        self._n_cases = 0

    def compute(self) -> dict[str, Any]:
        """Results over every case added on every process.

        Returns:
            ``classes`` (evaluated class indices), ``dice_pooled`` ``(C',)`` from the summed counts,
            ``case_ids`` (list), ``per_case`` ``{key: (n_cases, C')}`` for ``dice, hd, hd95, assd,
            hd95_voxels, nsd``, and per key over cases: ``mean`` ``(C',)`` (NaN left out),
            ``n_nan`` and ``n_inf`` ``(C',)``. Tensors are float64 on the CPU.
        """
        counts = summed_copy(self.dice_counts).cpu()
        rows = gathered_rows(self._rows)
        k = len(self.classes)
        values = torch.tensor([r for _, r in rows], dtype=torch.float64).view(len(rows), len(CASE_KEYS), k)
        per_case = {key: values[:, j] for j, key in enumerate(CASE_KEYS)}
        return {
            "classes": list(self.classes),
            "dice_pooled": dice_from_counts(counts[self.classes[0] :]),
            "case_ids": [case_id for case_id, _ in rows],
            "per_case": per_case,
            "mean": {key: _nanmean(v) for key, v in per_case.items()},
            "n_nan": {key: torch.isnan(v).sum(0) for key, v in per_case.items()},
            "n_inf": {key: torch.isinf(v).sum(0) for key, v in per_case.items()},
        }
