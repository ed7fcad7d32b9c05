"""Per image, class and confidence bin: ``(sum p, sum [y == c], weight)`` with hard or soft bins, in a few passes.

The L1-ACE losses need three ``(B, C, bins)`` sums over the voxels. Each probability touches at
most two neighbouring bins, and its share of each is affine in ``p`` inside one *cell* (an interval
of ``p`` between two bin edges, hard, or two bin centres, soft). So the voxels are histogrammed
once, into cells, with the moments ``(count, sum p, sum p^2)`` per (image, class, label code, cell);
the bin sums are small linear combinations of those moments, written with ordinary (autograd)
tensor ops on ``(B, C, bins)``-sized tables.

One autograd function makes the moments, a chunk of voxels of one (image, class) row at a time:
a float64 position ``code term +- x`` (``x = p bins / (1 + eps32)``) truncated to an integer slot,
then one ``bincount`` per moment. Backward is a gather per row: ``dL/dp = g1[slot] + 2 p g2[slot]``
(``g1, g2`` the upstream gradients of the ``sum p`` and ``sum p^2`` moments). No ``(N, C, bins)``
tensor exists; between forward and backward only the slots are kept (one byte per entry up to
11 classes at 20 bins; the probabilities are kept by the softmax anyway). The float64 work buffers
are chunk-sized and reused, so they stay in cache (fresh memory is what costs most on CPU).
Float32 probabilities are accumulated in float64.

Cells (``x`` in ``[0, bins)``; the references' edges are ``j (1 + eps32) / bins``):

- hard: bin j holds ``j < x <= j + 1`` (right edge included, as ``torch.bucketize(right=False)``;
  ``x = 0`` is bin 0). The slot is ``trunc(code term + bins - x) = code term + bins - ceil(x)``, so
  the right-closed edges cost no extra pass; cell offset ``bins - 1 - j`` is bin j, offset ``bins``
  is ``p = 0`` (added to bin 0). The float64 arithmetic is exact for float32 probabilities (a
  float32 that is not an edge is at least ``ulp / 20`` from it, far above float64 rounding).
- soft: centres at ``x = j + 1/2``; cell ``k = floor(x + 1/2)``: ``k = 0`` is below the first centre
  and ``k = bins`` above the last (all weight to the end bin); in between, ``t = x + 1/2 - k`` goes to
  bin k and ``1 - t`` to bin ``k - 1``, so bin k gets ``sum t = a M1 - (k - 1/2) M0`` and
  ``sum p t = a M2 - (k - 1/2) M1`` (``a = bins / (1 + eps32)``).

The moments are kept per label code (``(B, C, C + 1, cells)``): the code-c rows of class c give
``sum [y == c]``, and code ``C`` marks ignored voxels, a block that is never read (so ignored voxels
add nothing and get a zero gradient).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
"""The bins cover ``[0, 1 + FLOAT32_EPS]`` (as the references), whatever the compute dtype."""
CHUNK_ELEMENTS = 32000
"""Voxels per chunk on CPU: the float64 work buffers (three of ``chunk`` entries) stay in cache, and
every op stays below ATen's parallel grain (32768 elements), so it runs inline in its thread with
no intra-op hand-off (which costs milliseconds per op when another process holds a core). The
parallelism is across (image, class) rows instead, one Python thread per torch thread."""


def bin_scale(num_bins: int) -> float:
    """``x = p * bin_scale`` is the position of ``p`` in bin widths (float64)."""
    return num_bins / (1.0 + FLOAT32_EPS)


def slot_dtype(block: int) -> torch.dtype:
    """The narrowest integer type that ``bincount`` takes and that holds slots ``[0, block)``."""
    return torch.uint8 if block <= 256 else torch.int16 if block <= 2**15 else torch.int32


class _Rows:
    """The per-(image, class) row work of :class:`_CellMoments`, chunk by chunk."""

    def __init__(self, probs: Tensor, codes: Tensor, num_bins: int, soft: bool) -> None:
        batch, classes, voxels = probs.shape
        self.probs, self.codes, self.soft = probs.detach(), codes, soft
        self.cells = num_bins + 1
        self.block = (classes + 1) * self.cells  # slots of one row: label code x cell
        # slot = code * cells + trunc(shift +- x): hard shift bins (offset bins - ceil(x)), soft 1/2
        self.code_term = torch.arange(classes + 1, dtype=torch.float64, device=probs.device) * self.cells
        self.code_term += 0.5 if soft else float(num_bins)
        self.scale = bin_scale(num_bins) * (1.0 if soft else -1.0)
        self.chunk = min(voxels, CHUNK_ELEMENTS if probs.device.type == "cpu" else voxels)
        self.rows = [(b, c) for b in range(batch) for c in range(classes)]

    def parts(self) -> list[slice]:
        voxels = self.probs.shape[2]
        return [slice(start, min(start + self.chunk, voxels)) for start in range(0, voxels, self.chunk)]

    def run(self, task: Callable[[int, int], None]) -> None:
        """``task(b, c)`` for every row: on CPU spread over ``torch.get_num_threads()`` threads
        (each row's result is written by one thread, in a fixed order: deterministic)."""
        workers = min(torch.get_num_threads(), len(self.rows)) if self.probs.device.type == "cpu" else 1

        def guarded(row: tuple[int, int]) -> None:
            with torch.no_grad():  # grad mode is per thread
                task(*row)

        if workers <= 1:
            for row in self.rows:
                guarded(row)
            return
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(guarded, self.rows))

    def moments(self, slots: Tensor, out: Tensor) -> None:
        """Fill ``slots`` ``(B, C, N)`` and add each row's moments to ``out`` ``(k, B, C, block)``."""
        probs, codes, block = self.probs, self.codes, self.block

        def row(b: int, c: int) -> None:
            work = torch.empty(3, self.chunk, dtype=torch.float64, device=probs.device)
            for part in self.parts():
                voxel_term, p64, position = work[:, : part.stop - part.start]
                torch.index_select(self.code_term, 0, codes[b, part], out=voxel_term)
                p = probs[b, c, part]
                if p.dtype != torch.float64:
                    p = p64.copy_(p)  # float64 input: p is a view of probs, never written to
                torch.add(voxel_term, p, alpha=self.scale, out=position)
                slot = slots[b, c, part].copy_(position)  # truncation: position >= 0
                out[0, b, c] += torch.bincount(slot, minlength=block)
                out[1, b, c] += torch.bincount(slot, p, minlength=block)
                if self.soft:
                    out[2, b, c] += torch.bincount(slot, torch.mul(p, p, out=position), minlength=block)

        self.run(row)

    def gather(self, slots: Tensor, g_sum: Tensor, g_square: Tensor | None, grad: Tensor) -> None:
        """``grad = g_sum[slot] + g_square[slot] * p`` row by row (tables ``(B, C, block)``)."""
        probs = self.probs

        def row(b: int, c: int) -> None:
            index = torch.empty(self.chunk, dtype=torch.int32, device=probs.device)
            slope = torch.empty(self.chunk, dtype=probs.dtype, device=probs.device)
            for part in self.parts():
                size = part.stop - part.start
                slot = index[:size].copy_(slots[b, c, part])  # index_select wants int32 / int64
                out = torch.index_select(g_sum[b, c], 0, slot, out=grad[b, c, part])
                if g_square is not None:
                    out.addcmul_(torch.index_select(g_square[b, c], 0, slot, out=slope[:size]), probs[b, c, part])

        self.run(row)


class _CellMoments(torch.autograd.Function):
    """``(B, C, C + 1, bins + 1)`` moments per (image, class, label code, cell), float64: count,
    sum p and (soft) sum p^2. Code ``C`` marks ignored voxels."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, probs: Tensor, codes: Tensor, num_bins: int, soft: bool
    ) -> tuple[Tensor, ...]:
        batch, classes, _ = probs.shape
        rows = _Rows(probs, codes, num_bins, soft)
        moments = torch.zeros(3 if soft else 2, batch, classes, rows.block, dtype=torch.float64, device=probs.device)
        slots = torch.empty(probs.shape, dtype=slot_dtype(rows.block), device=probs.device)
        rows.moments(slots, moments)
        ctx.save_for_backward(probs, slots)
        ctx.num_bins, ctx.soft = num_bins, soft
        outputs = moments.reshape(-1, batch, classes, classes + 1, rows.cells).unbind(0)
        ctx.mark_non_differentiable(outputs[0])
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        probs, slots = ctx.saved_tensors
        batch, classes, _ = probs.shape
        rows = _Rows(probs, torch.empty(0), ctx.num_bins, ctx.soft)
        g_sum = grads[1].reshape(batch, classes, -1).to(probs.dtype)
        g_square = 2 * grads[2].reshape(batch, classes, -1).to(probs.dtype) if ctx.soft else None
        grad = torch.empty_like(probs)
        rows.gather(slots, g_sum, g_square, grad)
        return grad, None, None, None


def _interior_shares(m0: Tensor, m1: Tensor, m2: Tensor, num_bins: int) -> tuple[Tensor, Tensor]:
    """Soft cells 1..bins-1: each cell's ``(sum t, sum p t)``, the shares of its right bin."""
    half = torch.arange(1, num_bins, dtype=m0.dtype, device=m0.device) - 0.5
    a = bin_scale(num_bins)
    inner = slice(1, num_bins)
    return a * m1[..., inner] - half * m0[..., inner], a * m2[..., inner] - half * m1[..., inner]


def _soft_bins(m0: Tensor, moment: Tensor, shares: Tensor, num_bins: int) -> Tensor:
    """Bin totals of one soft statistic: end cells whole, inner cells split left / right."""
    total = torch.zeros(*m0.shape[:-1], num_bins, dtype=m0.dtype, device=m0.device)
    total = total.index_add(-1, torch.tensor([0, num_bins - 1], device=m0.device), moment[..., [0, num_bins]])
    if num_bins > 1:
        inner = moment[..., 1:num_bins]
        total = total + torch.nn.functional.pad(inner - shares, (0, 1)) + torch.nn.functional.pad(shares, (1, 0))
    return total


def binned_sums(
    probs: Tensor, labels: Tensor, valid: Tensor, num_bins: int, soft: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(sum p, sum [y == c], weight)``, each ``(B, C, num_bins)`` float64, differentiable in ``probs``.

    Args:
        probs: ``(B, C, N)`` float32 or float64 probabilities.
        labels: ``(B, N)`` int64 labels in ``[0, C)`` on valid voxels (anything on ignored ones).
        valid: ``(B, N)`` bool, False on ignored voxels.
        num_bins: equal bins on ``[0, 1 + eps32]``.
        soft: linear interpolation between neighbouring bin centres instead of hard bins.
    """
    classes = probs.shape[1]
    codes = labels if bool(valid.all()) else labels.masked_fill(~valid, classes)
    moments = _CellMoments.apply(probs, codes, num_bins, soft)
    if soft:
        m0, m1, m2 = moments
        t_sum, pt_sum = _interior_shares(m0, m1, m2, num_bins)
        weight = _soft_bins(m0, m0, t_sum, num_bins)
        sum_p = _soft_bins(m0, m1, pt_sum, num_bins)
    else:
        # cell offset bins - 1 - j is bin j (x in (j, j + 1]); offset bins (p = 0) joins bin 0
        def fold(m: Tensor) -> Tensor:
            bins = m[..., :num_bins].flip(-1)
            return torch.cat([bins[..., :1] + m[..., num_bins:], bins[..., 1:]], dim=-1)

        weight, sum_p = fold(moments[0]), fold(moments[1])
    # (B, C, C + 1, bins): class x label code; code C (ignored voxels) is dropped
    labelled = torch.diagonal(weight, dim1=1, dim2=2).movedim(-1, 1)
    return sum_p[:, :, :classes].sum(2), labelled, weight[:, :, :classes].sum(2)
