"""Per image, class and confidence bin: ``(sum p, sum [y == c], weight)`` with hard or soft bins, in bounded memory.

The L1-ACE losses need three ``(B, C, bins)`` sums over the voxels. Written with autograd ops, every
voxel keeps its bin indices, interpolation weights and products until backward (several
``(B, C, N)`` tensors, more than one ``(N, C, bins)`` tensor at 128^3). Here forward and backward
walk the voxels in chunks and keep nothing but the probabilities (which the softmax keeps anyway):
backward recomputes each voxel's bins and writes the gradient

- hard bins: ``dL/dp = w g_S[bin]`` (the bin assignment is piecewise constant);
- soft bins, p between centres ``c_l`` and ``c_r``, ``t = (p - c_l)/(c_r - c_l)``:
  ``dL/dp = w ((1 - t) g_S[l] + t g_S[r] + (p (g_S[r] - g_S[l]) + y (g_Y[r] - g_Y[l]) + g_W[r] - g_W[l]) / (c_r - c_l))``
  (the last term is 0 at the end bins, where all of p's weight sits in one bin),

with ``g_S, g_Y, g_W`` the upstream gradients of the three sums and ``w`` the voxel's weight
(0 on ignored voxels).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
"""The bins cover ``[0, 1 + FLOAT32_EPS]`` (as the references), whatever the compute dtype."""
CHUNK_ELEMENTS = 1 << 21  # (B, C, voxels) entries per chunk: a few chunk-sized temporaries at a time


def sorted_position(values: Tensor, table: Tensor) -> Tensor:
    """``torch.bucketize(values, table)`` (smallest i with ``values <= table[i]``, else ``len(table)``)
    for an equally spaced ``table``: an arithmetic guess, corrected by one step against the table
    itself, so the result is bucketize's exactly (a binary search costs several times more)."""
    n = table.numel()
    if n == 1:
        return (values > table[0]).long()
    step = (table[-1] - table[0]) / (n - 1)
    guess = torch.ceil((values - table[0]) / step).clamp_(0, n).long()
    padded = torch.cat([table.new_full((1,), -torch.inf), table, table.new_full((1,), torch.inf)])
    guess += (values > padded.take(guess + 1)).long()  # above table[guess]: one up
    guess -= (values <= padded.take(guess)).long()  # not above table[guess - 1]: one down
    return guess


def bin_table(num_bins: int, soft: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Upper bin edges (hard) or bin centres (soft) of ``num_bins`` equal bins on ``[0, 1 + eps32]``."""
    grid = torch.linspace(0.0, 1.0 + FLOAT32_EPS, 2 * num_bins + 1, dtype=dtype, device=device)
    if soft:
        return grid[1::2].contiguous()
    return torch.linspace(0.0, 1.0 + FLOAT32_EPS, num_bins + 1, dtype=dtype, device=device)[1:]


class _Chunk:
    """One slice of voxels ``[start, stop)``: probabilities, weights, labels as a one-hot mask, and
    each entry's bins: ``low`` / ``high`` flat indices into ``(B, C, bins)`` and ``t`` (soft) or
    the single bin ``low`` (hard)."""

    def __init__(self, probs: Tensor, labels: Tensor, weight: Tensor, table: Tensor, soft: bool, rows: Tensor) -> None:
        num_bins = table.numel()
        self.p = probs
        self.w = weight.unsqueeze(1)
        self.y = labels.unsqueeze(1) == torch.arange(probs.shape[1], device=probs.device).reshape(1, -1, 1)
        if soft:
            above = sorted_position(probs, table)  # first centre >= p
            left = (above - 1).clamp_(0, num_bins - 1)
            right = above.clamp_(max=num_bins - 1)
            low_centre = table.take(left)
            gap = table.take(right) - low_centre
            self.slope = torch.where(left != right, gap.clamp_min_(FLOAT32_EPS).reciprocal_(), 0.0)
            self.t = (probs - low_centre).mul_(self.slope)
            self.low, self.high = left.add_(rows), right.add_(rows)
        else:
            self.low = sorted_position(probs, table).clamp_(max=num_bins - 1).add_(rows)
            self.t = None


def _chunks(probs: Tensor, labels: Tensor, weight: Tensor, table: Tensor, soft: bool) -> Iterator[tuple[slice, _Chunk]]:
    batch, classes, voxels = probs.shape
    rows = torch.arange(batch * classes, device=probs.device).mul_(table.numel()).reshape(batch, classes, 1)
    step = max(1, CHUNK_ELEMENTS // max(batch * classes, 1))
    for start in range(0, voxels, step):
        part = slice(start, min(start + step, voxels))
        yield part, _Chunk(probs[:, :, part], labels[:, part], weight[:, part], table, soft, rows)


class _BinnedSums(torch.autograd.Function):
    """``(3, B, C, bins)``: sums of ``w p``, ``w [y == c]`` and ``w`` per bin (soft: interpolated)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, probs: Tensor, labels: Tensor, weight: Tensor, num_bins: int, soft: bool
    ) -> Tensor:
        batch, classes = probs.shape[:2]
        table = bin_table(num_bins, soft, probs.dtype, probs.device)
        sums = probs.new_zeros(3, batch * classes * num_bins)
        for _, chunk in _chunks(probs, labels, weight, table, soft):
            wy = chunk.w * chunk.y
            parts = [(chunk.low, 1.0 - chunk.t if soft else None), (chunk.high, chunk.t)] if soft else [(chunk.low, None)]
            for index, share in parts:
                flat = index.reshape(-1)
                w = chunk.w if share is None else chunk.w * share
                sums[0].scatter_add_(0, flat, (w * chunk.p).reshape(-1))
                sums[1].scatter_add_(0, flat, (wy if share is None else wy * share).reshape(-1))
                sums[2].scatter_add_(0, flat, w.expand_as(chunk.p).reshape(-1))
        ctx.save_for_backward(probs, labels, weight)
        ctx.num_bins, ctx.soft = num_bins, soft
        return sums.reshape(3, batch, classes, num_bins)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        probs, labels, weight = ctx.saved_tensors
        table = bin_table(ctx.num_bins, ctx.soft, probs.dtype, probs.device)
        g_sum, g_y, g_w = grad.reshape(3, -1).unbind(0)
        grad_probs = torch.empty_like(probs)
        for part, chunk in _chunks(probs, labels, weight, table, ctx.soft):
            low = g_sum.take(chunk.low)
            if not ctx.soft:
                grad_probs[:, :, part] = low * chunk.w
                continue
            high = g_sum.take(chunk.high)
            spread = (high - low).mul_(chunk.p)
            spread += torch.where(chunk.y, g_y.take(chunk.high) - g_y.take(chunk.low), 0.0)
            spread += g_w.take(chunk.high) - g_w.take(chunk.low)
            value = torch.lerp(low, high, chunk.t).add_(spread.mul_(chunk.slope))
            grad_probs[:, :, part] = value.mul_(chunk.w)
        return grad_probs, None, None, None, None


def binned_sums(probs: Tensor, labels: Tensor, weight: Tensor, num_bins: int, soft: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(sum p, sum [y == c], weight)``, each ``(B, C, num_bins)``, differentiable in ``probs``.

    Args:
        probs: ``(B, C, N)`` probabilities.
        labels: ``(B, N)`` int64 labels (any class on ignored voxels).
        weight: ``(B, N)`` 1 on counted voxels, 0 on ignored ones (probs' dtype).
        num_bins: equal bins on ``[0, 1 + eps32]``.
        soft: linear interpolation between neighbouring bin centres instead of hard bins.
    """
    sums = _BinnedSums.apply(probs, labels.contiguous(), weight.contiguous(), num_bins, soft)
    return sums[0], sums[1], sums[2]
