"""Calibration of segmentation probabilities (SPEC §3): ECE, MCE, class-wise ECE, NLL and Brier score,
per region of the ground truth (``all``, ``foreground``, ``boundary`` band), streamed.

Every voxel is a sample. Top-label confidence ``max_k p_k``, prediction ``argmax_k p_k`` (first
maximum on ties), ``M`` equal-width bins ``(b/M, (b+1)/M]`` with index
``clamp(ceil(p M) - 1, 0, M - 1)`` (0 goes to the first bin, 1 to the last).

- ECE = sum_b (n_b / N) |acc_b - conf_b|; MCE = max over non-empty bins of |acc_b - conf_b|.
- CECE: for each class k every voxel contributes ``p_k`` with outcome ``[y == k]``;
  CECE_k = sum_b (n_kb / N) |freq_kb - conf_kb|; CECE = mean over the evaluated classes (all C,
  or 1..C-1 with ``include_background=False``).
- NLL = mean -log max(p_y, eps); Brier = mean sum_k (p_k - [y == k])^2.

The state is a few fixed-size float64 tensors of sufficient statistics per (region, class, bin)
-- never a list of voxels -- so batches, volumes and processes combine by summation (dataset-level
pooling, SPEC's default). Per-case values (a few floats per case) are kept beside them, including
the "MedIA" convention: per-volume ECE on ground-truth foreground voxels, averaged over volumes.

The module (:class:`CalibrationMetric`) and the functional forms (:func:`expected_calibration_error`,
:func:`classwise_calibration_error`) share ``_calibration_update`` / ``_calibration_compute``.

References: Guo et al., "On Calibration of Modern Neural Networks", ICML 2017; Kull et al.,
"Beyond temperature scaling: obtaining well-calibrated multiclass probabilities with Dirichlet
calibration", NeurIPS 2019 (class-wise ECE); Murugesan et al., Medical Image Analysis 87, 2023.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from segcalib.metrics.binning import case_histograms
from segcalib.spatial.regions import RegionContext, available_regions, region_mask
from segcalib.spatial.spacing import BatchSpacingLike, spacing_per_case
from segcalib.metrics.state import SummableState
from segcalib.utils.distributed import is_distributed
from segcalib.utils.tensors import as_label_map

DEFAULT_REGIONS = ("all", "foreground", "boundary")
_MAX_PARTIAL_REGIONS = 7  # cells are bit sets in uint8, one value kept for ignored voxels


# --------------------------------------------------------------------------- validation


def _calibration_arg_validation(
    num_classes: int, n_bins: int, regions: Sequence[str], boundary_mm: float, include_background: bool
) -> None:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if not include_background and num_classes < 2:
        raise ValueError("include_background=False needs num_classes >= 2")
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    if isinstance(regions, str) or len(regions) == 0:
        raise ValueError(f"regions must be a non-empty sequence of names, got {regions!r}")
    if len(set(regions)) != len(regions):
        raise ValueError(f"regions must not repeat, got {regions!r}")
    unknown = [r for r in regions if r not in available_regions()]
    if unknown:
        raise ValueError(f"unknown regions {unknown}; available: {available_regions()}")
    if sum(r != "all" for r in regions) > _MAX_PARTIAL_REGIONS:
        raise ValueError(f"at most {_MAX_PARTIAL_REGIONS} regions besides 'all'")
    if not (math.isfinite(boundary_mm) and boundary_mm >= 0):
        raise ValueError(f"boundary_mm must be finite and >= 0, got {boundary_mm!r}")


def _calibration_tensor_validation(
    probs: torch.Tensor, target: torch.Tensor, num_classes: int | None
) -> torch.Tensor:
    """Check types and shapes; return the int64 ``(B, *S)`` target. (With ``validate_args``, the
    value ranges are checked by the histogram kernel, chunk by chunk.)"""
    if not torch.is_tensor(probs) or not probs.is_floating_point():
        raise ValueError("probs must be a floating point tensor (B, C, *spatial)")
    if probs.dim() not in (4, 5):
        raise ValueError(f"probs must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(probs.shape)}")
    if num_classes is not None and probs.shape[1] != num_classes:
        raise ValueError(f"probs has {probs.shape[1]} channels, expected num_classes={num_classes}")
    if target.is_floating_point() or target.is_complex():
        raise ValueError(f"target must hold integer labels, got dtype {target.dtype}")
    return as_label_map(target.to(probs.device), probs)


# --------------------------------------------------------------------------- update


def _region_cells(
    target: torch.Tensor,
    regions: Sequence[str],
    context: RegionContext,
    ignore_index: int | None,
) -> tuple[torch.Tensor | None, int, torch.Tensor, torch.Tensor]:
    """Split the voxels into disjoint cells (combinations of region memberships).

    Returns ``cells`` (uint8 ``(B, *S)`` or ``None``), the number of cells, the ``(R, n_cells)``
    float64 membership matrix (region r = sum of its cells) and the target with ignored voxels set
    to 0 (they go to the dropped cell ``n_cells``).
    """
    masks: list[torch.Tensor] = []
    bit_of: dict[str, int] = {}
    for name in regions:
        mask = region_mask(name, context)
        if mask is not None:
            bit_of[name] = len(masks)
            masks.append(mask)
    n_cells = 2 ** len(masks)
    cells_ids = torch.arange(n_cells)
    membership = torch.stack(
        [
            ((cells_ids >> bit_of[name]) & 1).double() if name in bit_of else torch.ones(n_cells, dtype=torch.float64)
            for name in regions
        ]
    ).to(target.device)
    ignored = target == ignore_index if ignore_index is not None else None
    if not masks and ignored is None:
        return None, 1, membership, target
    cells = torch.zeros(target.shape, dtype=torch.uint8, device=target.device)
    for bit, mask in enumerate(masks):
        cells |= mask.to(torch.uint8) << bit
    if ignored is not None:
        cells.masked_fill_(ignored, n_cells)
        target = target.masked_fill(ignored, 0)
    return cells, n_cells, membership, target


def _calibration_update(
    probs: torch.Tensor,
    target: torch.Tensor,
    *,
    n_bins: int,
    regions: Sequence[str] = ("all",),
    spacing: BatchSpacingLike = None,
    boundary_mm: float = 2.0,
    ignore_index: int | None = None,
    top: bool = True,
    classwise: bool = True,
    scores: bool = True,
    nll_eps: float = 1e-12,
    validate_args: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """Per-case sufficient statistics per region, in one pass over each case's voxels.

    Args:
        probs: ``(B, C, *spatial)`` probabilities.
        target: int64 ``(B, *spatial)`` labels (validated).
        n_bins: number of bins ``M``.
        regions: region names (see :mod:`segcalib.spatial.regions`).
        spacing: mm per voxel (shared or per case), for the boundary band.
        boundary_mm: half-width of the boundary band in mm.
        ignore_index: label of voxels to leave out everywhere.
        top, classwise, scores: which statistics to gather.
        nll_eps: floor on ``p_y`` in the NLL.
        validate_args: check that labels (ignored ones aside) lie in ``0..C-1`` and probabilities
            in ``[0, 1]`` (ValueError).

    Returns:
        One dict per case with ``top`` ``(R, M, 3)`` (count, sum confidence, sum correct),
        ``classwise`` ``(R, C, M, 3)`` (count, sum p_k, sum [y == k]) and ``scores`` ``(R, 3)``
        (voxels, sum NLL, sum Brier), those requested, float64 on the input's device.
    """
    batch, num_classes = probs.shape[:2]
    ndim = probs.dim() - 2
    context = RegionContext(
        target=target,
        spacing=spacing_per_case(spacing, batch, ndim),
        num_classes=num_classes,
        boundary_mm=boundary_mm,
        ignore_index=ignore_index,
    )
    cells, n_cells, membership, target = _region_cells(target, regions, context, ignore_index)
    out = []
    for b in range(batch):
        hist = case_histograms(
            probs[b].reshape(num_classes, -1),
            target[b].reshape(-1),
            n_bins,
            None if cells is None else cells[b].reshape(-1),
            n_cells,
            top=top or scores,
            classwise=classwise,
            scores=scores,
            nll_eps=nll_eps,
            validate=validate_args,
        )
        case: dict[str, torch.Tensor] = {}
        if top:
            case["top"] = torch.tensordot(membership, hist.top, dims=1)
        if classwise:
            case["classwise"] = torch.tensordot(membership, hist.classwise, dims=1)
        if scores:
            voxels = hist.top[..., 0].sum(-1, keepdim=True)
            case["scores"] = torch.tensordot(membership, torch.cat([voxels, hist.scores], -1), dims=1)
        out.append(case)
    return out


# --------------------------------------------------------------------------- compute


def _ece(top: torch.Tensor) -> torch.Tensor:
    """ECE from ``(..., M, 3)`` top-label statistics (NaN when empty)."""
    n = top[..., 0].sum(-1)
    return (top[..., 2] - top[..., 1]).abs().sum(-1) / n


def _mce(top: torch.Tensor) -> torch.Tensor:
    """MCE over non-empty bins from ``(..., M, 3)`` statistics (NaN when empty)."""
    count = top[..., 0]
    gaps = (top[..., 2] - top[..., 1]).abs() / count
    gaps = torch.where(count > 0, gaps, torch.full_like(gaps, -math.inf)).amax(-1)
    return torch.where(torch.isinf(gaps), torch.full_like(gaps, math.nan), gaps)


def _classwise_ece(classwise: torch.Tensor) -> torch.Tensor:
    """Per-class ECE ``(..., C)`` from ``(..., C, M, 3)`` class-wise statistics."""
    n = classwise[..., 0].sum(-1)
    return (classwise[..., 2] - classwise[..., 1]).abs().sum(-1) / n


def _evaluated_classes(num_classes: int, include_background: bool) -> slice:
    return slice(0 if include_background else 1, num_classes)


def _region_summary(top: torch.Tensor, classwise: torch.Tensor, scores: torch.Tensor, include_background: bool) -> dict:
    """JSON-ready summary of one region from its statistics (CPU float64 tensors)."""
    num_classes = classwise.shape[0]
    voxels = scores[0]
    per_class = _classwise_ece(classwise)
    count = top[:, 0]
    cls_count = classwise[..., 0]
    return {
        "ece": float(_ece(top)),
        "mce": float(_mce(top)),
        "cece": float(per_class[_evaluated_classes(num_classes, include_background)].mean()),
        "cece_per_class": per_class.tolist(),
        "nll": float(scores[1] / voxels),
        "brier": float(scores[2] / voxels),
        "n_voxels": int(voxels),
        "reliability": {
            "confidence": (top[:, 1] / count).tolist(),
            "accuracy": (top[:, 2] / count).tolist(),
            "count": [int(c) for c in count.tolist()],
        },
        "classwise_reliability": [
            {
                "confidence": (classwise[k, :, 1] / cls_count[k]).tolist(),
                "frequency": (classwise[k, :, 2] / cls_count[k]).tolist(),
                "count": [int(c) for c in cls_count[k].tolist()],
            }
            for k in range(num_classes)
        ],
    }


def _calibration_compute(
    top: torch.Tensor,
    classwise: torch.Tensor,
    scores: torch.Tensor,
    regions: Sequence[str],
    include_background: bool = True,
) -> dict[str, dict]:
    """``{region: summary}`` from pooled ``(R, M, 3)``, ``(R, C, M, 3)`` and ``(R, 3)`` statistics."""
    top, classwise, scores = top.cpu(), classwise.cpu(), scores.cpu()
    return {
        name: _region_summary(top[r], classwise[r], scores[r], include_background) for r, name in enumerate(regions)
    }


# --------------------------------------------------------------------------- module


class CalibrationMetric(SummableState):
    """Streaming calibration metrics per region: ECE, MCE, CECE, NLL, Brier, reliability bins.

    Example:
        >>> metric = CalibrationMetric(num_classes=3)
        >>> for probs, target, spacing in loader:      # probs (B, C, *S), target (B, *S)
        ...     metric.update(probs, target, spacing=spacing)
        >>> metric.sync()                             # under torch.distributed, on every rank
        >>> report = metric.compute()                 # {"all": {...}, "foreground": ..., ...}

    Args:
        num_classes: number of classes ``C`` (background included).
        n_bins: number of equal-width confidence bins ``M``.
        regions: names of the regions to evaluate (``all``, ``foreground``, ``boundary`` or any
            registered with :func:`segcalib.spatial.regions.register_region`).
        boundary_mm: half-width in mm of the ``boundary`` band.
        include_background: whether CECE averages over class 0 too.
        per_case: keep per-case ECE / CECE / voxel counts and the MedIA foreground ECE.
        ignore_index: label of voxels to leave out everywhere (``None``: none).
        nll_eps: floor on ``p_y`` inside the NLL's log (a probability of exactly 0 would give inf).
        validate_args: check value ranges of the inputs (one host sync per chunk of voxels).
    """

    def __init__(
        self,
        num_classes: int,
        n_bins: int = 15,
        regions: Sequence[str] = DEFAULT_REGIONS,
        boundary_mm: float = 2.0,
        include_background: bool = True,
        per_case: bool = True,
        ignore_index: int | None = None,
        nll_eps: float = 1e-12,
        validate_args: bool = True,
    ) -> None:
        super().__init__()
        regions = tuple(regions)
        _calibration_arg_validation(num_classes, n_bins, regions, boundary_mm, include_background)
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
        self._local: dict[str, Any] | None = None  # local state kept by sync() for unsync()

    # ----- configuration
    def config(self) -> dict[str, Any]:
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

    def _check_local(self, action: str) -> None:
        if self._local is not None:
            raise RuntimeError(f"cannot {action} a synced metric; call unsync() or reset() first")

    # ----- update / merge / reset
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
        self._check_local("update")
        target = _calibration_tensor_validation(probs, target, self.num_classes)
        if case_ids is not None and len(case_ids) != probs.shape[0]:
            raise ValueError(f"{len(case_ids)} case_ids for a batch of {probs.shape[0]}")
        if probs.device != self.device:
            self.to(probs.device)
        cases = _calibration_update(
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
        evaluated = _evaluated_classes(self.num_classes, self.include_background)
        for i, case in enumerate(cases):
            self.add_to_state(
                {"top_stats": case["top"], "classwise_stats": case["classwise"], "score_stats": case["scores"]}
            )
            if self.per_case:
                values = torch.cat(
                    [_ece(case["top"]), _classwise_ece(case["classwise"])[:, evaluated].mean(-1), case["scores"][:, 0]]
                )
                self._records.append((case_ids[i] if case_ids is not None else self._n_cases + i, values))
        self._n_cases += len(cases)

    def merge(self, other: CalibrationMetric) -> CalibrationMetric:
        """Add another metric's state and per-case records to this one (returns ``self``)."""
        self._check_local("merge into")
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
        self._local = None

    # ----- distributed
    def sync(self) -> None:
        """Sum the state over all processes and gather the per-case records (call on every rank).

        A no-op in one process. The local state is kept; :meth:`unsync` restores it.
        """
        if not is_distributed() or self._local is not None:
            return
        self._local = {
            "state": {k: v.clone() for k, v in self.state_tensors().items()},
            "records": list(self._records),
            "n_cases": self._n_cases,
        }
        self.all_reduce_state()
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self._materialized_records(), self._n_cases))
        self._records = [rec for records, _ in gathered for rec in records]
        self._n_cases = sum(n for _, n in gathered)

    def unsync(self) -> None:
        """Return to the local (pre-:meth:`sync`) state."""
        if self._local is None:
            return
        for name, value in self._local["state"].items():
            getattr(self, name).copy_(value)
        self._records = self._local["records"]
        self._n_cases = self._local["n_cases"]
        self._local = None

    # ----- results
    def _materialized_records(self) -> list[tuple[Any, list[float]]]:
        """Per-case records as Python floats (one device-to-host copy for all of them)."""
        pending = [i for i, (_, v) in enumerate(self._records) if torch.is_tensor(v)]
        if pending:
            values = torch.stack([self._records[i][1].to(self.device) for i in pending]).cpu().tolist()
            for i, vals in zip(pending, values):
                self._records[i] = (self._records[i][0], vals)
        return list(self._records)  # type: ignore[arg-type]

    def _per_case(self) -> list[dict[str, Any]]:
        r = len(self.regions)
        out = []
        for case_id, values in self._materialized_records():
            rec = {
                "case_id": case_id,
                "ece": dict(zip(self.regions, values[:r])),
                "cece": dict(zip(self.regions, values[r : 2 * r])),
                "n_voxels": {name: int(v) for name, v in zip(self.regions, values[2 * r :])},
            }
            if "foreground" in self.regions:
                rec["foreground_ece"] = rec["ece"]["foreground"]
            out.append(rec)
        return out

    def compute(self) -> dict[str, Any]:
        """The pooled metrics per region, plus per-case records (see the module docstring).

        Returns:
            ``{region: {"ece", "mce", "cece", "cece_per_class", "nll", "brier", "n_voxels",
            "reliability": {"confidence", "accuracy", "count"}, "classwise_reliability":
            [{"confidence", "frequency", "count"} per class]}}`` and, with ``per_case``,
            ``"per_case"`` (list of ``{"case_id", "ece": {region}, "cece": {region},
            "n_voxels": {region}[, "foreground_ece"]}``) and ``"media_foreground_ece"`` (mean
            over volumes of the per-volume foreground ECE, volumes without foreground left out;
            only when ``foreground`` is a region). Empty regions give NaN and ``n_voxels`` 0.
        """
        out: dict[str, Any] = _calibration_compute(
            self.top_stats, self.classwise_stats, self.score_stats, self.regions, self.include_background
        )
        if self.per_case:
            per_case = self._per_case()
            out["per_case"] = per_case
            if "foreground" in self.regions:
                values = [c["foreground_ece"] for c in per_case if not math.isnan(c["foreground_ece"])]
                out["media_foreground_ece"] = sum(values) / len(values) if values else math.nan
        return out

    # ----- saving partial results
    def to_dict(self) -> dict[str, Any]:
        """Configuration, state and per-case records as plain Python (JSON-serialisable)."""
        return {
            "config": self.config(),
            "state": {name: t.cpu().tolist() for name, t in self.state_tensors().items()},
            "records": [[case_id, values] for case_id, values in self._materialized_records()],
            "n_cases": self._n_cases,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], device: torch.device | str = "cpu") -> CalibrationMetric:
        """Rebuild a metric saved with :meth:`to_dict`."""
        metric = cls(**data["config"])
        metric.to(device)
        for name, values in data["state"].items():
            getattr(metric, name).copy_(torch.tensor(values, dtype=torch.float64))
        metric._records = [(case_id, list(values)) for case_id, values in data["records"]]
        metric._n_cases = int(data["n_cases"])
        return metric


def _what_it_measures(metric: CalibrationMetric) -> dict[str, Any]:
    """The configuration that must agree for two states to add up (input checking aside)."""
    return {k: v for k, v in metric.config().items() if k != "validate_args"}


# --------------------------------------------------------------------------- functional


def _pooled(cases: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    return torch.stack([c[key] for c in cases]).sum(0)


def expected_calibration_error(
    probs: torch.Tensor,
    target: torch.Tensor,
    n_bins: int = 15,
    ignore_index: int | None = None,
    validate_args: bool = True,
) -> float:
    """Top-label ECE over all voxels of a batch (SPEC §3 binning).

    Args:
        probs: ``(B, C, *spatial)`` probabilities.
        target: ``(B, *spatial)`` or ``(B, 1, *spatial)`` integer labels.
        n_bins: number of equal-width bins.
        ignore_index: label of voxels to leave out.
        validate_args: check value ranges.
    """
    _calibration_arg_validation(max(probs.shape[1], 1), n_bins, ("all",), 0.0, True)
    target = _calibration_tensor_validation(probs, target, None)
    cases = _calibration_update(
        probs,
        target,
        n_bins=n_bins,
        ignore_index=ignore_index,
        top=True,
        classwise=False,
        scores=False,
        validate_args=validate_args,
    )
    return float(_ece(_pooled(cases, "top")[0]))


def classwise_calibration_error(
    probs: torch.Tensor,
    target: torch.Tensor,
    n_bins: int = 15,
    include_background: bool = True,
    ignore_index: int | None = None,
    validate_args: bool = True,
) -> float:
    """Class-wise ECE (mean over the evaluated classes) over all voxels of a batch.

    Args:
        probs: ``(B, C, *spatial)`` probabilities.
        target: ``(B, *spatial)`` or ``(B, 1, *spatial)`` integer labels.
        n_bins: number of equal-width bins.
        include_background: average over class 0 too.
        ignore_index: label of voxels to leave out.
        validate_args: check value ranges.
    """
    num_classes = probs.shape[1]
    _calibration_arg_validation(num_classes, n_bins, ("all",), 0.0, include_background)
    target = _calibration_tensor_validation(probs, target, None)
    cases = _calibration_update(
        probs,
        target,
        n_bins=n_bins,
        ignore_index=ignore_index,
        top=False,
        classwise=True,
        scores=False,
        validate_args=validate_args,
    )
    per_class = _classwise_ece(_pooled(cases, "classwise")[0])
    return float(per_class[_evaluated_classes(num_classes, include_background)].mean())
