"""Calibration statistics and their reductions (SPEC §3), as functions: validation, the one-pass
update into per-region sufficient statistics, and ECE / MCE / class-wise ECE from them.

Every voxel is a sample. Top-label confidence ``max_k p_k``, prediction ``argmax_k p_k`` (first
maximum on ties), ``M`` equal-width bins ``(b/M, (b+1)/M]`` with index
``clamp(ceil(p M) - 1, 0, M - 1)`` (0 goes to the first bin, 1 to the last).

- ECE = sum_b (n_b / N) |acc_b - conf_b|; MCE = max over non-empty bins of |acc_b - conf_b|.
- CECE: for each class k every voxel contributes ``p_k`` with outcome ``[y == k]``;
  CECE_k = sum_b (n_kb / N) |freq_kb - conf_kb|; CECE = mean over the evaluated classes (all C,
  or 1..C-1 with ``include_background=False``).
- NLL = mean -log max(p_y, eps); Brier = mean sum_k (p_k - [y == k])^2.

:class:`segcalib.metrics.CalibrationMetric` streams these statistics; the functional forms
:func:`expected_calibration_error` and :func:`classwise_calibration_error` reduce one batch.

References: Guo et al., ICML 2017; Kull et al., NeurIPS 2019 (class-wise ECE); Murugesan et al.,
Medical Image Analysis 87, 2023.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from segcalib.metrics.inputs import INCLUDE_BACKGROUND

from segcalib.metrics.binning import HistogramRequest, batch_histograms
from segcalib.spatial.regions import ALL, RegionContext, available_regions, region_cells
from segcalib.spatial.spacing import BatchSpacingLike, spacing_per_case
from segcalib.utils.tensors import as_label_map

MAX_BINS = 10_000  # a histogram per region, class and bin: more would only cost memory


def calibration_arg_validation(
    num_classes: int, n_bins: int, regions: Sequence[str], boundary_mm: float, include_background: bool
) -> None:
    """ValueError naming the argument when the metric's configuration is invalid."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if not include_background and num_classes < 2:
        raise ValueError("include_background=False needs num_classes >= 2")
    if not isinstance(n_bins, int) or not 1 <= n_bins <= MAX_BINS:
        raise ValueError(f"n_bins must be an integer in [1, {MAX_BINS}], got {n_bins!r}")
    if isinstance(regions, str) or len(regions) == 0:
        raise ValueError(f"regions must be a non-empty sequence of names, got {regions!r}")
    if len(set(regions)) != len(regions):
        raise ValueError(f"regions must not repeat, got {regions!r}")
    unknown = [r for r in regions if r not in available_regions()]
    if unknown:
        raise ValueError(f"unknown regions {unknown}; available: {available_regions()}")
    if not (math.isfinite(boundary_mm) and boundary_mm >= 0):
        raise ValueError(f"boundary_mm must be finite and >= 0, got {boundary_mm!r}")


def calibration_tensor_validation(probs: torch.Tensor, target: torch.Tensor, num_classes: int | None) -> torch.Tensor:
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


def calibration_update(
    probs: torch.Tensor,
    target: torch.Tensor,
    *,
    n_bins: int,
    regions: Sequence[str] = (ALL,),
    spacing: BatchSpacingLike = None,
    boundary_mm: float = 2.0,
    ignore_index: int | None = None,
    top: bool = True,
    classwise: bool = True,
    scores: bool = True,
    nll_eps: float = 1e-12,
    validate_args: bool = True,
    backend: str | None = None,
) -> dict[str, torch.Tensor]:
    """Per-case sufficient statistics per region, in one pass over the batch's voxels.

    The regions become disjoint cells (:func:`~segcalib.spatial.regions.region_cells`); one
    histogram pass fills every (case, cell, class, bin) and a ``(R, n_cells)`` membership product
    turns cells into regions. Nothing in it waits for the device unless ``validate_args`` (one
    check of the value ranges) or a region's definition does.

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
        backend: histogram backend (see :func:`~segcalib.metrics.binning.batch_histograms`).

    Returns:
        The requested statistics with a leading case axis: ``top`` ``(B, R, M, 3)`` (count, sum
        confidence, sum correct), ``classwise`` ``(B, R, C, M, 3)`` (count, sum p_k, sum
        [y == k]) and ``scores`` ``(B, R, 3)`` (voxels, sum NLL, sum Brier), float64 on the
        input's device.
    """
    batch, num_classes = probs.shape[:2]
    context = RegionContext(
        target=target,
        spacing=spacing_per_case(spacing, batch, probs.dim() - 2),
        num_classes=num_classes,
        boundary_mm=boundary_mm,
        ignore_index=ignore_index,
    )
    cells, n_cells, membership, target = region_cells(target, regions, context, ignore_index)
    request = HistogramRequest(top=top or scores, classwise=classwise, scores=scores, nll_eps=nll_eps,
                               validate=validate_args)
    hist = batch_histograms(
        probs.reshape(batch, num_classes, -1),
        target.reshape(batch, -1),
        n_bins,
        None if cells is None else cells.reshape(batch, -1),
        n_cells,
        request,
        backend,
    )
    # region r of case b = sum over the cells z of membership[r, z] * statistic[b, z]
    out: dict[str, torch.Tensor] = {}
    if top:
        out["top"] = torch.einsum("rz,bz...->br...", membership, hist.top)
    if classwise:
        out["classwise"] = torch.einsum("rz,bz...->br...", membership, hist.classwise)
    if scores:
        voxels = hist.top[..., 0].sum(-1, keepdim=True)
        out["scores"] = torch.einsum("rz,bzs->brs", membership, torch.cat([voxels, hist.scores], -1))
    return out


def ece_from_bins(top: torch.Tensor) -> torch.Tensor:
    """ECE from ``(..., M, 3)`` top-label statistics (NaN when empty)."""
    n = top[..., 0].sum(-1)
    return (top[..., 2] - top[..., 1]).abs().sum(-1) / n


def mce_from_bins(top: torch.Tensor) -> torch.Tensor:
    """MCE over non-empty bins from ``(..., M, 3)`` statistics (NaN when empty)."""
    count = top[..., 0]
    gaps = (top[..., 2] - top[..., 1]).abs() / count
    gaps = torch.where(count > 0, gaps, torch.full_like(gaps, -math.inf)).amax(-1)
    return torch.where(torch.isinf(gaps), torch.full_like(gaps, math.nan), gaps)


def classwise_ece_from_bins(classwise: torch.Tensor) -> torch.Tensor:
    """Per-class ECE ``(..., C)`` from ``(..., C, M, 3)`` class-wise statistics."""
    n = classwise[..., 0].sum(-1)
    return (classwise[..., 2] - classwise[..., 1]).abs().sum(-1) / n


def evaluated_classes(num_classes: int, include_background: bool) -> slice:
    """The classes a class-wise mean runs over (MONAI's ``include_background``)."""
    return slice(0 if include_background else 1, num_classes)


def _pooled_update(probs: torch.Tensor, target: torch.Tensor, key: str, **kwargs) -> torch.Tensor:
    """One batch's statistics ``key`` summed over its cases, for region ``all``."""
    target = calibration_tensor_validation(probs, target, None)
    stats = calibration_update(probs, target, top=key == "top", classwise=key == "classwise", scores=False, **kwargs)
    return stats[key].sum(0)[0]


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
    calibration_arg_validation(max(probs.shape[1], 1), n_bins, (ALL,), 0.0, True)
    top = _pooled_update(probs, target, "top", n_bins=n_bins, ignore_index=ignore_index, validate_args=validate_args)
    return float(ece_from_bins(top))


def classwise_calibration_error(
    probs: torch.Tensor,
    target: torch.Tensor,
    n_bins: int = 15,
    include_background: bool = INCLUDE_BACKGROUND,
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
    calibration_arg_validation(num_classes, n_bins, (ALL,), 0.0, include_background)
    stats = _pooled_update(
        probs, target, "classwise", n_bins=n_bins, ignore_index=ignore_index, validate_args=validate_args
    )
    return float(classwise_ece_from_bins(stats)[evaluated_classes(num_classes, include_background)].mean())
