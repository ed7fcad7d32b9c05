"""Confidence binning and the one-pass histogram behind the calibration metrics (SPEC §3).

Bins: ``b = clamp(ceil(p * M) - 1, 0, M - 1)`` evaluated in float64 (exact for float16/32 inputs,
whose product with ``M`` is exact in float64), i.e. bins ``(b/M, (b+1)/M]`` with ``p = 0`` in the
first bin and ``p = 1`` in the last.

One pass over the voxels of a case fills, per cell (a disjoint piece of the image: the
combination of region memberships, see :func:`segcalib.spatial.regions.region_cells`) and bin:

- top label: count, sum of confidence ``max_k p_k``, sum of correct (argmax == target, first
  maximum on ties, as ``torch.max``);
- class-wise, for every class k: count, sum of ``p_k``, sum of ``[target == k]``;
- per cell: sum of NLL ``-log max(p_y, eps)`` and of Brier ``sum_k (p_k - [y == k])^2``.

This module is the reference: a few ``torch.bincount`` histograms in float64 over chunks of
voxels, on any device. On CPU the tuned kernel of :mod:`segcalib.metrics.binning_cpu` computes the
same statistics faster (see ``benchmarks/bench_metrics.py``); both are tested against NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_CHUNK_ENTRIES = {"cpu": 2**21, "cuda": 2**27}  # (class, voxel) entries per chunk


def bin_index(p: torch.Tensor, n_bins: int) -> torch.Tensor:
    """SPEC bin index ``clamp(ceil(p * n_bins) - 1, 0, n_bins - 1)`` (int64), computed in float64."""
    return (p.double() * n_bins).ceil_().sub_(1).clamp_(0, n_bins - 1).long()


@dataclass(frozen=True)
class HistogramRequest:
    """Which statistics :func:`case_histograms` gathers and how (its keyword arguments)."""

    top: bool = True
    classwise: bool = True
    scores: bool = True
    nll_eps: float = 1e-12
    validate: bool = False
    chunk_size: int | None = None


@dataclass
class Histograms:
    """Per-cell sufficient statistics of one case (float64; ``None`` when not requested).

    Attributes:
        top: ``(n_cells, M, 3)``: count, sum of confidence, sum of correct.
        classwise: ``(n_cells, C, M, 3)``: count, sum of ``p_k``, sum of ``[y == k]``.
        scores: ``(n_cells, 2)``: sum of NLL, sum of Brier.
    """

    top: torch.Tensor | None = None
    classwise: torch.Tensor | None = None
    scores: torch.Tensor | None = None


def case_histograms(
    probs: torch.Tensor,
    target: torch.Tensor,
    n_bins: int,
    cells: torch.Tensor | None = None,
    n_cells: int = 1,
    *,
    top: bool = True,
    classwise: bool = True,
    scores: bool = True,
    nll_eps: float = 1e-12,
    validate: bool = False,
    chunk_size: int | None = None,
    tuned: bool | None = None,
) -> Histograms:
    """Sufficient statistics of one case, per cell and bin, in one pass over its voxels.

    Args:
        probs: ``(C, N)`` class probabilities (float16/32/64; rows may be strided views).
        target: int64 ``(N,)`` labels in ``0..C-1``.
        n_bins: number of equal-width bins ``M``.
        cells: integer ``(N,)`` cell of each voxel in ``0..n_cells-1``; the value ``n_cells``
            drops the voxel (ignored voxels). ``None``: every voxel in cell 0.
        n_cells: number of cells.
        top, classwise, scores: which statistics to gather (``scores`` needs ``top``).
        nll_eps: floor on ``p_y`` inside the log of the NLL.
        validate: check that the labels lie in ``0..C-1`` and the probabilities in ``[0, 1]``
            (ValueError otherwise).
        chunk_size: voxels per chunk (bounds the temporary memory).
        tuned: use the tuned CPU kernel (default: on CPU tensors).
    """
    if cells is None and n_cells != 1:
        raise ValueError("n_cells must be 1 when cells is None")
    if scores and not top:
        raise ValueError("scores need top=True (the voxel counts come from the top-label histogram)")
    if tuned if tuned is not None else probs.device.type == "cpu":
        from segcalib.metrics.binning_cpu import tuned_case_histograms

        request = HistogramRequest(top, classwise, scores, nll_eps, validate, chunk_size)
        return tuned_case_histograms(probs, target, n_bins, cells, n_cells, request)
    num_classes, n_vox = probs.shape
    slots = n_cells + 1  # the extra slot collects dropped voxels
    chunk = max(1, chunk_size or _CHUNK_ENTRIES.get(probs.device.type, 2**21) // max(num_classes, 1))
    f64 = torch.float64
    sums = {
        "top": torch.zeros(slots * n_bins, 3, dtype=f64, device=probs.device),
        "classwise": torch.zeros(slots * num_classes * n_bins, 3, dtype=f64, device=probs.device),
        "scores": torch.zeros(slots, 2, dtype=f64, device=probs.device),
    }
    for start in range(0, n_vox, chunk):
        p = probs[:, start : start + chunk].to(f64)
        y = target[start : start + chunk].long()
        cell = torch.zeros_like(y) if cells is None else cells[start : start + chunk].long()
        if validate:
            _check_ranges(p, y, num_classes)
        confidence, prediction = p.max(0)
        if top:
            index = cell * n_bins + bin_index(confidence, n_bins)
            _add(sums["top"], index, torch.ones_like(confidence), confidence, (prediction == y).to(f64))
        if classwise:
            classes = torch.arange(num_classes, device=p.device).view(-1, 1)
            index = (cell * num_classes + classes) * n_bins + bin_index(p, n_bins)
            _add(sums["classwise"], index.reshape(-1), torch.ones_like(p).reshape(-1), p.reshape(-1),
                 (classes == y).to(f64).reshape(-1))
        if scores:
            p_true = p.gather(0, y.view(1, -1))[0]
            nll = -p_true.clamp(min=nll_eps).log()
            brier = (p * p).sum(0) - 2 * p_true + 1
            _add(sums["scores"], cell, nll, brier)
    result = Histograms()
    if top:
        result.top = sums["top"].view(slots, n_bins, 3)[:n_cells]
    if classwise:
        result.classwise = sums["classwise"].view(slots, num_classes, n_bins, 3)[:n_cells]
    if scores:
        result.scores = sums["scores"][:n_cells]
    return result


def _add(acc: torch.Tensor, index: torch.Tensor, *columns: torch.Tensor) -> None:
    """``acc[index[i], j] += columns[j][i]`` for each column, as float64 histograms."""
    for j, weights in enumerate(columns):
        acc[:, j] += torch.bincount(index, weights=weights, minlength=acc.shape[0])


def _check_ranges(p: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
    """ValueError unless ``0 <= y < C`` and ``0 <= p <= 1`` (NaN fails)."""
    if y.numel() == 0:
        return
    low, high = int(y.min()), int(y.max())
    if not (low >= 0 and high < num_classes):
        raise ValueError(f"target labels must lie in 0..{num_classes - 1} (or equal ignore_index), got values in [{low}, {high}]")
    p_low, p_high = float(p.min()), float(p.max())
    if not (p_low >= 0.0 and p_high <= 1.0):
        raise ValueError(f"probs must lie in [0, 1], got values in [{p_low}, {p_high}]")
