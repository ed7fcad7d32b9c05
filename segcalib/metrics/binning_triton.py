"""The ``"triton"`` backend of :func:`segcalib.metrics.binning.batch_histograms`: one fused GPU
kernel reads each voxel's probabilities once and adds every statistic of every region, class and
case (SPEC §3 binning, the same sums as the torch ops of :mod:`segcalib.metrics.binning`).

Per block of voxels a program computes the top-label confidence and prediction (first maximum on
ties), the bin of the confidence and of every ``p_k`` (float64, SPEC formula), the cell index,
``p_y`` for the NLL and the Brier score, then reduces each statistic over the block into a small
local histogram (``one-hot(index) x weight``, summed over the block) and adds the non-empty bins
to the float64 accumulators with one atomic add each -- no host synchronisation, no temporary of
the volume's size. Counts are exact integers; sums are float64 throughout.

Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors through Triton's interpreter (how the
tests check it against the torch ops); the kernel is built on first use for the interpreter
setting then in force.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from segcalib.metrics.binning import HistogramRequest, Histograms, accumulated_histograms

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is missing
    triton = None
    tl = None

BLOCK = 128  # voxels per program (untuned: no GPU has run it yet)
MAX_CELL_BINS = 1024  # (cell, bin) pairs of a block-local histogram: BLOCK x this one-hot per program


def triton_supports(n_bins: int, n_cells: int) -> bool:
    """Whether the kernel's block-local histograms fit ``(n_cells + 1) * n_bins`` (cell, bin) pairs
    (the default 15 bins with up to 7 partial regions' 128 cells would not: 1935 pairs)."""
    return triton is not None and triton.next_power_of_2((n_cells + 1) * n_bins) <= MAX_CELL_BINS


def triton_available() -> bool:
    """Whether Triton imports (the kernel then runs on CUDA tensors, or anywhere interpreted)."""
    return triton is not None


def _interpreting() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)


def _histogram_kernel(
    probs, target, cells, top_acc, cls_acc, score_acc,
    n_vox, stride_pb, stride_pc, stride_pn, stride_tb, stride_tn, stride_cb, stride_cn,
    nll_eps_ptr,
    N_CLASSES: tl.constexpr, N_BINS: tl.constexpr, N_CELLS: tl.constexpr, HAS_CELLS: tl.constexpr,
    TOP: tl.constexpr, CLASSWISE: tl.constexpr, SCORES: tl.constexpr,
    CELL_BINS: tl.constexpr, SLOT_BINS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """One program: ``BLOCK_SIZE`` voxels of case ``program_id(1)``."""
    case = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    valid = offs < n_vox
    label = tl.load(target + case * stride_tb + offs * stride_tn, mask=valid, other=0).to(tl.int32)
    if HAS_CELLS:
        cell = tl.load(cells + case * stride_cb + offs * stride_cn, mask=valid, other=N_CELLS).to(tl.int32)
    else:
        cell = tl.zeros([BLOCK_SIZE], dtype=tl.int32)
    cell = tl.where(valid, cell, N_CELLS)  # padding lanes go to the dropped slot
    slots = N_CELLS + 1
    first_slot = case * slots
    bins = tl.arange(0, CELL_BINS)  # local (cell, bin) index, cell * N_BINS + bin
    kept = bins < N_CELLS * N_BINS  # the dropped slot is never written

    p_base = probs + case * stride_pb + offs * stride_pn
    confidence = tl.load(p_base, mask=valid, other=0.0).to(tl.float64)
    prediction = tl.zeros([BLOCK_SIZE], dtype=tl.int32)
    p_true = tl.where(label == 0, confidence, 0.0)
    square_sum = confidence * confidence
    for k in tl.static_range(N_CLASSES):
        p_k = tl.load(p_base + k * stride_pc, mask=valid, other=0.0).to(tl.float64)
        if k > 0:
            better = p_k > confidence  # strict: the first maximum wins ties
            confidence = tl.where(better, p_k, confidence)
            prediction = tl.where(better, k, prediction)
            p_true = tl.where(label == k, p_k, p_true)
            square_sum += p_k * p_k
        if CLASSWISE:
            b_k = tl.minimum(tl.maximum(tl.ceil(p_k * N_BINS) - 1.0, 0.0), N_BINS - 1.0).to(tl.int32)
            hit = (cell * N_BINS + b_k)[:, None] == bins[None, :]
            count = tl.sum(hit.to(tl.int32), axis=0)
            p_sum = tl.sum(tl.where(hit, p_k[:, None], 0.0), axis=0)
            pos = tl.sum((hit & (label == k)[:, None]).to(tl.int32), axis=0)
            # global row ((case * slots + cell) * C + k) * M + bin
            row = ((first_slot + bins // N_BINS) * N_CLASSES + k) * N_BINS + bins % N_BINS
            write = kept & (count > 0)
            tl.atomic_add(cls_acc + row * 3, count.to(tl.float64), mask=write)
            tl.atomic_add(cls_acc + row * 3 + 1, p_sum, mask=write)
            tl.atomic_add(cls_acc + row * 3 + 2, pos.to(tl.float64), mask=write & (pos > 0))
    if TOP:
        b_top = tl.minimum(tl.maximum(tl.ceil(confidence * N_BINS) - 1.0, 0.0), N_BINS - 1.0).to(tl.int32)
        hit = (cell * N_BINS + b_top)[:, None] == bins[None, :]
        count = tl.sum(hit.to(tl.int32), axis=0)
        conf_sum = tl.sum(tl.where(hit, confidence[:, None], 0.0), axis=0)
        correct = tl.sum((hit & (prediction == label)[:, None]).to(tl.int32), axis=0)
        row = first_slot * N_BINS + bins
        write = kept & (count > 0)
        tl.atomic_add(top_acc + row * 3, count.to(tl.float64), mask=write)
        tl.atomic_add(top_acc + row * 3 + 1, conf_sum, mask=write)
        tl.atomic_add(top_acc + row * 3 + 2, correct.to(tl.float64), mask=write & (correct > 0))
    if SCORES:
        nll_eps = tl.load(nll_eps_ptr)  # float64 (a scalar argument would arrive as float32)
        nll = -tl.log(tl.maximum(p_true, nll_eps))
        brier = square_sum - 2.0 * p_true + 1.0
        slot_ids = tl.arange(0, SLOT_BINS)
        hit = cell[:, None] == slot_ids[None, :]
        nll_sum = tl.sum(tl.where(hit, nll[:, None], 0.0), axis=0)
        brier_sum = tl.sum(tl.where(hit, brier[:, None], 0.0), axis=0)
        write = (slot_ids < N_CELLS) & (tl.sum(hit.to(tl.int32), axis=0) > 0)
        tl.atomic_add(score_acc + (first_slot + slot_ids) * 2, nll_sum, mask=write)
        tl.atomic_add(score_acc + (first_slot + slot_ids) * 2 + 1, brier_sum, mask=write)


@lru_cache(maxsize=2)
def _kernel(interpret: bool):
    """The jitted kernel for the interpreter setting in force (Triton reads it when jitting)."""
    return triton.jit(_histogram_kernel)


def triton_histograms(
    probs: torch.Tensor,
    target: torch.Tensor,
    n_bins: int,
    cells: torch.Tensor | None,
    n_cells: int,
    request: HistogramRequest,
) -> Histograms:
    """:func:`~segcalib.metrics.binning.batch_histograms` in one fused kernel launch (inputs already
    validated by the caller when asked; ``request.chunk_size`` does not apply: no temporaries)."""
    if triton is None:
        raise RuntimeError("the 'triton' histogram backend needs Triton (pip install triton)")
    if not triton_supports(n_bins, n_cells):
        raise ValueError(
            f"the 'triton' histogram backend holds at most {MAX_CELL_BINS} (cell, bin) pairs per block, "
            f"got {n_cells + 1} cells x {n_bins} bins; use the 'torch' backend"
        )
    batch, num_classes, n_vox = probs.shape
    slots, f64, device = n_cells + 1, torch.float64, probs.device
    top_acc = torch.zeros(batch * slots * n_bins, 3, dtype=f64, device=device)
    cls_acc = torch.zeros(batch * slots * num_classes * n_bins if request.classwise else 1, 3, dtype=f64, device=device)
    score_acc = torch.zeros(batch * slots, 2, dtype=f64, device=device)
    if n_vox > 0:
        cell_arg = cells if cells is not None else target  # a placeholder pointer when HAS_CELLS is off
        grid = (triton.cdiv(n_vox, BLOCK), batch)
        _kernel(_interpreting())[grid](
            probs, target, cell_arg, top_acc, cls_acc, score_acc,
            n_vox, *probs.stride(), *target.stride(), *cell_arg.stride(),
            torch.full((1,), request.nll_eps, dtype=f64, device=device),  # a fill, not a host-to-device copy
            N_CLASSES=num_classes, N_BINS=n_bins, N_CELLS=n_cells, HAS_CELLS=cells is not None,
            TOP=request.top, CLASSWISE=request.classwise, SCORES=request.scores,
            CELL_BINS=triton.next_power_of_2(slots * n_bins), SLOT_BINS=triton.next_power_of_2(slots),
            BLOCK_SIZE=BLOCK, num_warps=4,
        )
    return accumulated_histograms(top_acc, cls_acc, score_acc, (batch, slots, num_classes, n_bins), n_cells, request)
