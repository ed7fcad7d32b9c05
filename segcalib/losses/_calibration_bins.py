"""Per image, class and confidence bin: ``(sum p, sum [y == c], weight)`` with hard or soft bins, in a few passes.

The L1-ACE losses need three ``(B, C, bins)`` sums over the voxels. Each probability touches at
most two neighbouring bins, and its share of each is affine in ``p`` inside one *cell* (an interval
of ``p`` between two bin edges, hard, or two bin centres, soft). So the voxels are histogrammed
once, into cells, with the moments ``(count, sum p, sum p^2)`` per (image, class, label code, cell);
the bin sums are small linear combinations of those moments, written with ordinary (autograd)
tensor ops on ``(B, C, bins)``-sized tables.

One autograd function makes the moments, a chunk of voxels of one image (all classes) at a time:
per class a float64 position ``code term +- x`` (``x = p bins / (1 + eps32)``) truncated to an
integer slot, then one ``bincount`` per moment. Backward is a gather per chunk:
``dL/dp = g1[slot] + 2 p g2[slot]`` (``g1, g2`` the upstream gradients of the ``sum p`` and
``sum p^2`` moments). No ``(N, C, bins)`` tensor exists; between forward and backward only the
slots are kept (one byte per entry up to 11 classes at 20 bins; the probabilities are kept by the
softmax anyway). The float64 work buffers are chunk-sized, so they stay in cache (fresh memory is
what costs most on CPU). Float32 probabilities are accumulated in float64.

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

On the CPU, with numba installed (the ``fast-cpu`` extra), the per-chunk ATen calls of
:class:`_Chunks` are replaced by the compiled loops of :mod:`._calibration_bins_numba` (same slots,
same moments up to the order of addition), run on torch's own OpenMP threads, and the backward from
logits is one fused pass (see docs/benchmarks.md for the speed).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from segcalib.losses import _calibration_bins_numba as numba_kernels

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
"""The bins cover ``[0, 1 + FLOAT32_EPS]`` (as the references), whatever the compute dtype."""
CHUNK_ELEMENTS = 32000
"""Voxels per chunk on CPU: the float64 work buffers (three of ``chunk`` entries) stay in cache, and
every op stays below ATen's parallel grain (32768 elements), so it runs inline with no intra-op
hand-off (which costs milliseconds per op when another process holds a core); chunks run one after
the other (2^16-2^18 were no faster on 2 idle cores)."""


def bin_scale(num_bins: int) -> float:
    """``x = p * bin_scale`` is the position of ``p`` in bin widths (float64)."""
    return num_bins / (1.0 + FLOAT32_EPS)


def slot_dtype(block: int) -> torch.dtype:
    """The narrowest integer type that ``bincount`` takes and that holds slots ``[0, block)``."""
    return torch.uint8 if block <= 256 else torch.int16 if block <= 2**15 else torch.int32


class _Chunks:
    """The work of :class:`_CellMoments`, one chunk of voxels of one image (all classes) at a time."""

    def __init__(self, probs: Tensor, codes: Tensor, num_bins: int, soft: bool) -> None:
        batch, classes, voxels = probs.shape
        self.probs, self.codes, self.soft = probs.detach(), codes, soft
        self.cells = num_bins + 1
        self.block = (classes + 1) * self.cells  # slots of one (image, class) row: label code x cell
        # slot = code * cells + trunc(shift +- x): hard shift bins (offset bins - ceil(x)), soft 1/2
        self.code_term = torch.arange(classes + 1, dtype=torch.float64, device=probs.device) * self.cells
        self.code_term += 0.5 if soft else float(num_bins)
        self.scale = bin_scale(num_bins) * (1.0 if soft else -1.0)
        self.chunk = min(voxels, CHUNK_ELEMENTS if probs.device.type == "cpu" else voxels)
        parts = [slice(start, min(start + self.chunk, voxels)) for start in range(0, voxels, self.chunk)]
        self.tasks = [(b, part) for b in range(batch) for part in parts]

    def run(self, task: Callable[[int, slice], Any]) -> list[Any]:
        """``task(b, part)`` for every chunk, in order. (Spreading the chunks over Python threads was
        slower: on 2 idle cores hardl1ace 20.9 ms with two threads, 14.5 ms without.)"""
        with torch.no_grad():
            return [task(*args) for args in self.tasks]

    def moments(self, slots: Tensor) -> Tensor:
        """Fill ``slots`` ``(B, C, N)``; the moments ``(k, B, C, block)`` (k = 2 hard, 3 soft)."""
        probs, codes, block = self.probs, self.codes, self.block
        if numba_kernels.usable(probs):
            return numba_kernels.cell_moments(probs, codes, self.code_term, self.scale, self.soft, slots, block)

        def chunk(b: int, part: slice) -> Tensor:
            size = part.stop - part.start
            voxel_term, p64, position = torch.empty(3, size, dtype=torch.float64, device=probs.device)
            torch.index_select(self.code_term, 0, codes[b, part], out=voxel_term)
            found: list[Tensor] = []
            for p, slot in zip(probs[b, :, part], slots[b, :, part]):
                if p.dtype != torch.float64:
                    p = p64.copy_(p)  # float64 input: p is a view of probs, never written to
                slot.copy_(torch.add(voxel_term, p, alpha=self.scale, out=position))  # truncation: >= 0
                found += [torch.bincount(slot, minlength=block), torch.bincount(slot, p, minlength=block)]
                if self.soft:
                    found.append(torch.bincount(slot, torch.mul(p, p, out=position), minlength=block))
            return torch.stack(found).reshape(classes, -1, block)  # (C, k, block)

        batch, classes, _ = probs.shape
        per_chunk = torch.stack(self.run(chunk)).reshape(batch, -1, classes, 3 if self.soft else 2, block)
        return per_chunk.sum(1).permute(2, 0, 1, 3)

    def gather(self, slots: Tensor, g_sum: Tensor, g_square: Tensor | None, grad: Tensor) -> None:
        """``grad = g_sum[slot] + g_square[slot] * p`` (tables ``(B, C, block)``), chunk by chunk."""
        probs = self.probs
        if numba_kernels.usable(probs):
            numba_kernels.gather(probs, slots, g_sum, g_square, grad)
            return

        def chunk(b: int, part: slice) -> None:
            size = part.stop - part.start
            index = torch.empty(size, dtype=torch.int32, device=probs.device)
            slope = torch.empty(size, dtype=probs.dtype, device=probs.device)
            for c, (p, slot, out) in enumerate(zip(probs[b, :, part], slots[b, :, part], grad[b, :, part])):
                index.copy_(slot)  # index_select wants int32 / int64
                torch.index_select(g_sum[b, c], 0, index, out=out)
                if g_square is not None:
                    out.addcmul_(torch.index_select(g_square[b, c], 0, index, out=slope), p)

        self.run(chunk)


class _CellMoments(torch.autograd.Function):
    """``(B, C, C + 1, bins + 1)`` moments per (image, class, label code, cell), float64: count,
    sum p and (soft) sum p^2. Code ``C`` marks ignored voxels.

    ``from_logits``: the input is logits and the softmax is taken here, so that backward returns the
    gradient of the logits in the buffer of the probabilities' gradient, ``(g - sum_c p g) * p`` in
    place, instead of handing it to a softmax backward that writes a third tensor of that size
    (fresh memory is what costs most on the CPU: 2-3 ms of page faults at 2 x 4 x 64^3)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, source: Tensor, codes: Tensor, num_bins: int, soft: bool, from_logits: bool
    ) -> tuple[Tensor, ...]:
        probs = source.softmax(1) if from_logits else source
        batch, classes, _ = probs.shape
        chunks = _Chunks(probs, codes, num_bins, soft)
        slots = torch.empty(probs.shape, dtype=slot_dtype(chunks.block), device=probs.device)
        moments = chunks.moments(slots)
        ctx.save_for_backward(probs, slots)
        ctx.num_bins, ctx.soft, ctx.from_logits = num_bins, soft, from_logits
        outputs = moments.reshape(-1, batch, classes, classes + 1, chunks.cells).unbind(0)
        ctx.mark_non_differentiable(outputs[0])
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        probs, slots = ctx.saved_tensors
        batch, classes, _ = probs.shape
        chunks = _Chunks(probs, torch.empty(0), ctx.num_bins, ctx.soft)
        g_sum = grads[1].reshape(batch, classes, -1).to(probs.dtype)
        g_square = 2 * grads[2].reshape(batch, classes, -1).to(probs.dtype) if ctx.soft else None
        grad = torch.empty_like(probs)
        if ctx.from_logits and numba_kernels.usable(probs):  # gather and the softmax's backward in one pass
            numba_kernels.gather_logits(probs, slots, g_sum, g_square, grad)
            return grad, None, None, None, None
        chunks.gather(slots, g_sum, g_square, grad)
        if ctx.from_logits:  # the softmax's backward, in place
            grad.sub_(torch.linalg.vecdot(probs, grad, dim=1).unsqueeze(1)).mul_(probs)
        return grad, None, None, None, None


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
    probs: Tensor, target: Tensor, ignore_index: int, num_bins: int, soft: bool, from_logits: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """``(sum p, sum [y == c], weight)``, each ``(B, C, num_bins)`` float64, differentiable in ``probs``.

    Args:
        probs: ``(B, C, N)`` float32 or float64 probabilities (``from_logits``: logits, whose
            softmax over the classes is taken here; cheaper when nothing else needs the probabilities).
        target: ``(B, N)`` int64 labels in ``[0, C)``, ``ignore_index`` on ignored voxels.
        ignore_index: the label of ignored voxels (they add nothing anywhere).
        num_bins: equal bins on ``[0, 1 + eps32]``.
        soft: linear interpolation between neighbouring bin centres instead of hard bins.
    """
    classes = probs.shape[1]
    if numba_kernels.usable(probs):
        codes = numba_kernels.label_codes(target, ignore_index, classes)
    else:
        valid = target != ignore_index
        codes = target if bool(valid.all()) else target.masked_fill(~valid, classes)
    moments = _CellMoments.apply(probs, codes, num_bins, soft, from_logits)
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
