"""Per image, class and confidence bin: ``(sum p, sum [y == c], weight)`` with hard or soft bins, in a few passes.

The L1-ACE losses need three ``(B, C, bins)`` sums over the voxels. Each probability touches at
most two neighbouring bins, and its share of each is affine in ``p`` inside one *cell* (an interval
of ``p`` between two bin edges, hard, or two bin centres, soft). So the voxels are histogrammed
once, into cells, with the moments ``(count, sum p, sum p^2)`` per (image, class, label code, cell);
the bin sums are small linear combinations of those moments, written with ordinary (autograd)
tensor ops on ``(B, C, bins)``-sized tables.

One autograd function makes the moments, a chunk of voxels of one image (all classes at once) at a
time: a float64 position ``class term + code term +- x`` (``x = p bins / (1 + eps32)``) truncated
to an integer slot, then one ``bincount`` per moment for every class of the chunk. Backward is a
gather per chunk: ``dL/dp = g1[slot] + 2 p g2[slot]`` (``g1, g2`` the upstream gradients of the
``sum p`` and ``sum p^2`` moments). No ``(N, C, bins)`` tensor exists; between forward and backward
only the slots are kept (one byte per voxel and class while ``C (C + 1) (bins + 1) <= 256``, two up
to 39 classes at 20 bins; the probabilities are kept by the softmax anyway). The float64 work
buffers are chunk-sized, so they stay in cache (fresh memory is what costs most on CPU). Float32
probabilities are accumulated in float64.

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

The moments are kept per class and label code (``(B, C, C + 1, cells)``): the code-c rows of class c give
``sum [y == c]``, and code ``C`` marks ignored voxels, a block that is never read (so ignored voxels
add nothing and get a zero gradient).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
"""The bins cover ``[0, 1 + FLOAT32_EPS]`` (as the references), whatever the compute dtype."""
CHUNK_ELEMENTS = 1 << 17
"""(voxel, class) entries per chunk on CPU: the float64 work buffers (1 MiB each) stay in cache
(fresh memory is what costs most on CPU), and every elementwise op is above ATen's parallel grain
(32768 elements), so it runs on all intra-op threads; ``bincount`` and ``index_select`` run on one."""


def bin_scale(num_bins: int) -> float:
    """``x = p * bin_scale`` is the position of ``p`` in bin widths (float64)."""
    return num_bins / (1.0 + FLOAT32_EPS)


def slot_dtype(width: int) -> torch.dtype:
    """The narrowest integer type that ``bincount`` takes and that holds slots ``[0, width)``."""
    return torch.uint8 if width <= 256 else torch.int16 if width <= 2**15 else torch.int32


class _Chunks:
    """The work of :class:`_CellMoments`, one chunk of voxels of one image (all classes at once) at
    a time. Slots are kept as ``(B, C * N)``, each chunk's ``(C, voxels)`` block contiguous, so one
    ``bincount`` per moment covers every class of a chunk."""

    def __init__(self, probs: Tensor, num_bins: int, soft: bool) -> None:
        batch, classes, voxels = probs.shape
        self.probs, self.soft = probs.detach(), soft
        self.cells = num_bins + 1
        self.block = (classes + 1) * self.cells  # slots of one (image, class): label code x cell
        self.width = classes * self.block  # slots of one image: class x label code x cell
        device = probs.device
        # slot = class * block + code * cells + trunc(shift +- x): hard shift bins (offset bins - ceil(x)), soft 1/2
        self.class_term = torch.arange(classes, dtype=torch.float64, device=device)[:, None] * self.block
        self.class_term += 0.5 if soft else float(num_bins)
        self.scale = bin_scale(num_bins) * (1.0 if soft else -1.0)
        chunk = max(1, CHUNK_ELEMENTS // classes) if device.type == "cpu" else voxels
        self.parts = [slice(start, min(start + chunk, voxels)) for start in range(0, voxels, chunk)]

    def _slots(self, slots: Tensor, b: int, part: slice) -> Tensor:
        """The ``(C, voxels)`` slot block of image b's chunk ``part``."""
        classes = self.probs.shape[1]
        return slots[b, classes * part.start : classes * part.stop].view(classes, -1)

    def moments(self, slots: Tensor, codes: Tensor) -> Tensor:
        """Fill ``slots`` ``(B, C * N)``; the moments ``(B, k, C * block)`` (k = 2 hard, 3 soft)."""
        probs, width = self.probs, self.width
        batch, classes, _ = probs.shape
        total = torch.zeros(batch, 3 if self.soft else 2, width, dtype=torch.float64, device=probs.device)
        with torch.no_grad():
            for b in range(batch):
                for part in self.parts:
                    p64, position = torch.empty(2, classes, part.stop - part.start, dtype=torch.float64, device=probs.device)
                    p64.copy_(probs[b, :, part])  # float64 input: a copy too (p64 is written to below)
                    torch.add(self.class_term, codes[b, part].to(torch.float64), alpha=self.cells, out=position)
                    slot = self._slots(slots, b, part)
                    slot.copy_(position.add_(p64, alpha=self.scale))  # truncation: >= 0
                    flat = slot.view(-1)
                    total[b, 0] += torch.bincount(flat, minlength=width)
                    total[b, 1] += torch.bincount(flat, p64.view(-1), minlength=width)
                    if self.soft:
                        total[b, 2] += torch.bincount(flat, p64.mul_(p64).view(-1), minlength=width)
        return total

    def gather(self, slots: Tensor, table: Tensor, grad: Tensor) -> None:
        """``grad = table[slot, 0] (+ table[slot, 1] * p)`` (``table`` ``(B, C * block, 1 or 2)``), chunk by chunk."""
        probs = self.probs
        batch, classes, _ = probs.shape
        with torch.no_grad():
            for b in range(batch):
                for part in self.parts:
                    index = self._slots(slots, b, part).view(-1).to(torch.int32)  # index_select: int32 / int64
                    rows = torch.index_select(table[b], 0, index).view(classes, -1, table.shape[-1])
                    out = grad[b, :, part]
                    if table.shape[-1] == 1:
                        out.copy_(rows[..., 0])
                    else:  # one gather of (g_sum, g_square) rows
                        torch.addcmul(rows[..., 0], rows[..., 1], probs[b, :, part], out=out)


class _CellMoments(torch.autograd.Function):
    """``(B, C, C + 1, bins + 1)`` moments per (image, class, label code, cell), float64: count,
    sum p and (soft) sum p^2. Code ``C`` marks ignored voxels."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, probs: Tensor, codes: Tensor, num_bins: int, soft: bool
    ) -> tuple[Tensor, ...]:
        batch, classes, voxels = probs.shape
        chunks = _Chunks(probs, num_bins, soft)
        slots = torch.empty(batch, classes * voxels, dtype=slot_dtype(chunks.width), device=probs.device)
        moments = chunks.moments(slots, codes)
        ctx.save_for_backward(probs, slots)
        ctx.num_bins, ctx.soft = num_bins, soft
        outputs = moments.reshape(batch, -1, classes, classes + 1, chunks.cells).unbind(1)
        ctx.mark_non_differentiable(outputs[0])
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        probs, slots = ctx.saved_tensors
        batch = probs.shape[0]
        chunks = _Chunks(probs, ctx.num_bins, ctx.soft)
        # dL/dp = g_sum[slot] + 2 p g_square[slot]
        columns = [grads[1], 2 * grads[2]] if ctx.soft else [grads[1]]
        table = torch.stack(columns, -1).reshape(batch, -1, len(columns)).to(probs.dtype)
        grad = torch.empty_like(probs)
        chunks.gather(slots, table, grad)
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
