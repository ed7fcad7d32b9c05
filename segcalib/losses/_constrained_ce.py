"""CE plus CRaC's region- and class-wise constraint penalty in one pass over the logits.

The value and the gradient are computed together in the forward (the gradient of both terms is
elementwise), on a one-thread CPU in chunks of voxels small enough that a chunk's elementwise steps
run in the cache (one chunk on accelerators and with several threads); the backward only scales
the saved gradient. Every step writes into one of four scratch buffers of a chunk's size
(``out=`` and in place: a fresh tensor per step cost more than the step itself) and broadcasts at
most one operand along the voxels (ATen vectorises such loops, not those with two). Everything
label-derived (one-hot, window counts, boundary) is prepared once per batch, without gradient, by
the caller (:class:`ConstraintTerms`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from segcalib.losses._penalties import Penalty

CHUNK_ELEMENTS = 1 << 17
"""Logit entries per chunk on the CPU (512 KiB of float32): few Python steps, scratch buffers in the
cache (2^16 and 2^17 were the fastest at 2 x 4 x 64^3 on one thread, 2^18 slower)."""


@dataclass(frozen=True)
class ConstraintTerms:
    """Label-derived inputs of :class:`ConstrainedCrossEntropy`, ``N`` voxels flattened.

    Attributes:
        onehot: ``(B, C, N)`` uint8 one-hot labels, all 0 on ignored voxels.
        boundary: ``(B, 1, N)`` uint8, 1 on the boundary region (valid voxels only), 0 elsewhere.
        counts: ``(B, C, N)`` integer window counts (:func:`segcalib.losses._filters.window_counts`).
        count: the number of valid voxels (at least 1).
        valid: ``(B, 1, N)`` 1.0 on valid voxels, 0.0 on ignored ones, or None when none is ignored.
    """

    onehot: Tensor
    boundary: Tensor
    counts: Tensor
    count: float
    valid: Tensor | None


def _chunks(tensors: list[Tensor | None], voxels: int, classes: int, device: torch.device) -> list[tuple]:
    """Matching pieces of ``(B, *, N)`` tensors (None stays None): one sample and ``CHUNK_ELEMENTS // C``
    voxels at a time on a CPU with one intra-op thread; the whole batch at once on accelerators and
    with several threads, where every op is a parallel region whose cost is its synchronisation (a
    thread descheduled by another process stalls each one), so fewer, larger ops are faster."""
    if device.type != "cpu" or torch.get_num_threads() > 1:
        return [tuple(tensors)]
    step = max(1, CHUNK_ELEMENTS // classes)
    pieces = []
    for t in tensors:
        if t is None:
            pieces.append(None)
            continue
        pieces.append([piece for b in range(t.shape[0]) for piece in t[b : b + 1].split(step, dim=2)])
    count = next(len(p) for p in pieces if p is not None)
    return [tuple(None if p is None else p[i] for p in pieces) for i in range(count)]


class _Scratch:
    """Flat buffers re-viewed as each chunk's contiguous ``(B', C, L)`` (or ``(B', 1, L)``)."""

    def __init__(self, like: Tensor, elements: int, count: int) -> None:
        self.buffers = [torch.empty(elements, dtype=like.dtype, device=like.device) for _ in range(count)]

    def views(self, shape: torch.Size) -> list[Tensor]:
        size = shape.numel()
        return [buffer[:size].view(shape) for buffer in self.buffers]


def _region_pairs(column: Tensor) -> tuple[Tensor, Tensor]:
    """``(R,)`` values (boundary, interior) as ``(1, R, 1)``: interior and boundary - interior."""
    return column[:, 1].reshape(1, -1, 1), (column[:, 0] - column[:, 1]).reshape(1, -1, 1)


class ConstrainedCrossEntropy(torch.autograd.Function):
    """``(ce + penalty, ce, penalty)`` of ``(B, C, N)`` logits; only the first output has a gradient.

    ``ce`` = mean NLL over the valid voxels; ``penalty`` = ``sum_{valid i, k} P(|g_ik - z_ik|;
    lam_ik, rho_ik) / norm`` with the targets ``g = counts * scale`` and ``lam``, ``rho``, ``scale``
    the values of the voxel's region (``table`` ``(2C + 1, 2)``: rows lambda_k, rho_k, then the
    target scale; columns boundary, interior); a voxel's value is ``interior + b (boundary -
    interior)``, b its 0/1 boundary flag. Gradient: ``(softmax - onehot) [valid] / count +
    sign(z - g) P'(h) / norm``. ``linear_quadratic`` (the caller's check that ``penalty`` is PHR
    with every ``lam >= 0`` and ``rho > 0``, which the multiplier schedule guarantees): for ``h >= 0``
    the penalty is then ``lam h + rho h^2 / 2`` and its gradient ``lam sign(z - g) + rho (z - g)``,
    computed so with the multipliers scaled by ``1 / norm`` first; otherwise the penalty's
    ``value`` and ``derivative`` are used.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, terms: ConstraintTerms, table: Tensor, penalty: Penalty,  # type: ignore[override]
                norm: float, linear_quadratic: bool) -> tuple[Tensor, Tensor, Tensor]:
        classes, voxels = logits.shape[1:]
        table = table.to(logits)
        multipliers = table[: 2 * classes] / norm if linear_quadratic else table[: 2 * classes]
        multiplier_in, multiplier_step = _region_pairs(multipliers)  # (1, 2C, 1): lambda_k, then rho_k
        scale_in, scale_step = table[2 * classes, 1], table[2 * classes, 0] - table[2 * classes, 1]
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        tensors = [logits, terms.onehot, terms.boundary, terms.counts, terms.valid, grad]
        chunks = _chunks(tensors, voxels, classes, logits.device)
        largest = max(c[0].numel() for c in chunks)
        scratch = _Scratch(logits, largest, 3)
        per_voxel = _Scratch(logits, 2 * largest, 1)  # lambda and rho of every voxel and class
        small = _Scratch(logits, largest // classes, 2)
        nll_parts: list[Tensor] = []
        linear_parts: list[Tensor] = []  # sum lam |gap| (linear_quadratic)
        square_parts: list[Tensor] = []  # sum (lam |gap| + rho gap^2) (linear_quadratic) or sum P
        for z, onehot, boundary, counts, valid, out in chunks:
            work, log_p, buf = scratch.views(z.shape)
            (both,) = per_voxel.views(torch.Size((z.shape[0], 2 * classes, z.shape[2])))
            lam, rho = both[:, :classes], both[:, classes:]
            flag, scale = small.views(boundary.shape)
            if not z.is_contiguous():  # log_softmax would copy it into a fresh tensor
                z = work.copy_(z)
            torch._log_softmax(z, 1, False, out=log_p)
            nll_parts.append(torch.dot(log_p.view(-1), buf.copy_(onehot).view(-1)))  # onehot 0 on ignored voxels
            error = log_p.exp_().sub_(buf)  # softmax - onehot
            if valid is not None:
                error.mul_(valid)
            flag.copy_(boundary)
            torch.mul(flag, scale_step, out=scale).add_(scale_in)  # the target's scale per voxel
            gap = torch.addcmul(z, buf.copy_(counts), scale, value=-1, out=work)  # z - target
            if valid is not None:
                gap.mul_(valid)  # ignored voxels: gap 0, so P(0) = 0 and no gradient
            torch.mul(flag, multiplier_step, out=both).add_(multiplier_in)  # lambda, rho per voxel and class
            if linear_quadratic:  # P = lam |gap| + rho gap^2 / 2 = (lam |gap| + dP/dz gap) / 2
                slope = torch.sign(gap, out=buf).mul_(lam)
                linear_parts.append(torch.dot(slope.view(-1), gap.view(-1)))
                change = slope.addcmul_(rho, gap)  # dP/dz = lam sign(gap) + rho gap
                square_parts.append(torch.dot(change.view(-1), gap.view(-1)))
            else:
                h = torch.abs(gap, out=buf)
                square_parts.append(penalty.value(h.clone(), lam, rho).sum())
                change = penalty.derivative(h, lam, rho).mul_(torch.sign(gap)).div_(norm)
            if out is not None:
                torch.add(change, error, alpha=1 / terms.count, out=out)
        ce = -torch.stack(nll_parts).sum() / terms.count
        if linear_quadratic:
            penalty_value = (torch.stack(linear_parts).sum() + torch.stack(square_parts).sum()) / 2
        else:
            penalty_value = torch.stack(square_parts).sum() / norm
        if grad is not None:
            ctx.grad = grad
        ctx.mark_non_differentiable(ce, penalty_value)
        return ce + penalty_value, ce, penalty_value

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_total: Tensor, grad_ce: Tensor, grad_penalty: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad = ctx.grad
        if grad_total.device.type == "cpu" and float(grad_total) == 1.0:
            return grad, None, None, None, None, None  # loss.backward(): the gradient as computed
        return grad * grad_total, None, None, None, None, None
