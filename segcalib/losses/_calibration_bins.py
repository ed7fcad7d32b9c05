"""Per image, class and confidence bin: ``(sum p, sum [y == c], weight)`` with hard or soft bins, in a few passes.

The L1-ACE losses need three ``(B, C, bins)`` sums over the voxels. Each probability touches at
most two neighbouring bins, and its share of each is affine in ``p`` inside one *cell* (an interval
of ``p`` between two bin edges, hard, or two bin centres, soft). So the voxels only need to be
histogrammed once, into cells, with the moments ``(count, sum p, sum p^2)`` per (label region,
image, class, cell); the bin sums are small linear combinations of those moments, written with
ordinary (autograd) tensor ops on ``(B, C, bins)`` tables. Per voxel entry the work is: one float64
position ``base - x`` or ``base + x + 1/2`` (``x = p * bins / (1 + eps32)``) truncated to an int32
slot, and one ``index_add_`` per moment; backward is the gather ``dL/dp = g1[slot] + 2 p g2[slot]``
(``g1, g2`` the upstream gradients of the ``sum p`` and ``sum p^2`` moments). No ``(N, C, bins)``
tensor exists; between forward and backward only the int32 slots are kept (the probabilities are
kept by the softmax anyway). Float32 probabilities are accumulated in float64.

Cells (``x`` in ``[0, bins)``; the references' edges are ``j (1 + eps32) / bins``):

- hard: bin j holds ``j < x <= j + 1`` (right edge included, as ``torch.bucketize(right=False)``;
  ``x = 0`` is bin 0). The slot is ``trunc(base + bins - x) = base + bins - ceil(x)``, so the
  right-closed edges cost no extra pass; slot offset ``bins - 1 - j`` is bin j, offset ``bins`` is
  ``p = 0`` (added to bin 0).
- soft: centres at ``x = j + 1/2``; cell ``k = floor(x + 1/2)``: ``k = 0`` is below the first centre
  and ``k = bins`` above the last (all weight to the end bin); in between, ``t = x + 1/2 - k`` goes to
  bin k and ``1 - t`` to bin ``k - 1``, so bin k gets ``sum t = a M1 - (k - 1/2) M0`` and
  ``sum p t = a M2 - (k - 1/2) M1`` (``a = bins / (1 + eps32)``).

The moments are kept per label code too (``(B, C + 1, C, cells)``): the code-c rows of class c give
``sum [y == c]``, and code ``C`` marks ignored voxels, a block that is never read (so ignored voxels
add nothing and get a zero gradient).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
"""The bins cover ``[0, 1 + FLOAT32_EPS]`` (as the references), whatever the compute dtype."""
CHUNK_ELEMENTS = 1 << 21  # (B, C, voxels) entries per chunk: bounds the float64 temporaries


def bin_scale(num_bins: int) -> float:
    """``x = p * bin_scale`` is the position of ``p`` in bin widths (float64)."""
    return num_bins / (1.0 + FLOAT32_EPS)


class _CellMoments(torch.autograd.Function):
    """``(B, C, C + 1, bins + 1)`` moments per (image, class, label code, cell), float64: count,
    sum p and (soft) sum p^2. Code ``C`` marks ignored voxels."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, probs: Tensor, codes: Tensor, num_bins: int, soft: bool
    ) -> tuple[Tensor, ...]:
        batch, classes, voxels = probs.shape
        cells = num_bins + 1
        block = (classes + 1) * cells  # slots of one (image, class) pair: label code x cell
        # slot in the pair's block = code * cells + trunc(shift +- x): hard shift bins (slot offset
        # bins - ceil(x)), soft shift 1/2 (floor(x + 1/2)); the per-voxel part is looked up by code
        code_term = torch.arange(classes + 1, dtype=torch.float64, device=probs.device) * cells
        code_term += 0.5 if soft else float(num_bins)
        scale = bin_scale(num_bins) * (1.0 if soft else -1.0)
        moments = torch.zeros(3 if soft else 2, batch * classes, block, dtype=torch.float64, device=probs.device)
        step = max(1, CHUNK_ELEMENTS // max(batch * classes, 1))
        slots = []
        for start in range(0, voxels, step):
            part = slice(start, min(start + step, voxels))
            p = probs[:, :, part].to(torch.float64)
            voxel_term = code_term.index_select(0, codes[:, part].reshape(-1)).reshape(batch, 1, -1)
            position = torch.add(voxel_term, p, alpha=scale)
            slot = position.to(torch.int32).reshape(batch * classes, -1)
            p = p.reshape(batch * classes, -1)  # a view of probs for float64 input: never written to
            square = torch.mul(p, p, out=position.reshape(p.shape)) if soft else None
            for row in range(batch * classes):
                moments[0, row] += torch.bincount(slot[row], minlength=block)
                moments[1, row] += torch.bincount(slot[row], p[row], minlength=block)
                if square is not None:
                    moments[2, row] += torch.bincount(slot[row], square[row], minlength=block)
            slots.append(slot)
        ctx.save_for_backward(probs, *slots)
        ctx.step = step
        outputs = moments.reshape(-1, batch, classes, classes + 1, cells).unbind(0)
        ctx.mark_non_differentiable(outputs[0])
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        probs, *slots = ctx.saved_tensors
        batch, classes, voxels = probs.shape
        rows = batch * classes
        g_sum = grads[1].reshape(rows, -1).to(probs.dtype)
        g_square = 2 * grads[2].reshape(rows, -1).to(probs.dtype) if len(grads) > 2 else None
        chunks = []
        for start, slot in zip(range(0, voxels, ctx.step), slots):
            grad = torch.empty(slot.shape, dtype=probs.dtype, device=probs.device)
            for row in range(rows):
                torch.index_select(g_sum[row], 0, slot[row], out=grad[row])
            if g_square is not None:
                slope = torch.empty_like(grad)
                for row in range(rows):
                    torch.index_select(g_square[row], 0, slot[row], out=slope[row])
                grad.addcmul_(slope, probs[:, :, start : start + ctx.step].reshape(grad.shape))
            chunks.append(grad.reshape(batch, classes, -1))
        grad_probs = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)
        return grad_probs, None, None, None


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
        probs: ``(B, C, N)`` probabilities.
        labels: ``(B, N)`` int64 labels in ``[0, C)`` on valid voxels (anything on ignored ones).
        valid: ``(B, N)`` bool, False on ignored voxels.
        num_bins: equal bins on ``[0, 1 + eps32]``.
        soft: linear interpolation between neighbouring bin centres instead of hard bins.
    """
    classes = probs.shape[1]
    codes = labels.masked_fill(~valid, classes).contiguous()
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
