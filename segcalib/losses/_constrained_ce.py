"""CE plus CRaC's region- and class-wise constraint penalty in one pass over the logits.

The value and the gradient are computed together in the forward (the gradient of both terms is
elementwise), on the CPU in chunks of voxels small enough that a chunk's elementwise steps run in
the cache (one chunk on accelerators); the backward only scales
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
    voxels at a time on the CPU, with any number of intra-op threads (on 2 idle cores at 2 x 4 x 64^3
    the loss took 10.1-10.8 ms chunked, 11.3-23.7 ms in one piece; beside a busy process, where a
    descheduled thread stalls every parallel region, fewer larger ops were faster); the whole batch
    at once on accelerators."""
    if device.type != "cpu":
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


class _Workspace:
    """Scratch buffers of the largest chunk, re-viewed (contiguous) for each chunk shape ``(B', C, L)``:
    three ``(B', C, L)`` buffers (``flat``: the same, flattened), the ``(B', 2C + 1, L)`` per-voxel
    values (lambda_k, rho_k, target scale) and the ``(B', 1, L)`` boundary flag."""

    def __init__(self, like: Tensor, largest: int, classes: int) -> None:
        self.classes = classes
        options = {"dtype": like.dtype, "device": like.device}
        self.buffers = [torch.empty(largest, **options) for _ in range(3)]
        self.values = torch.empty(largest // classes * (2 * classes + 1), **options)
        self.flag = torch.empty(largest // classes, **options)
        self.shapes: dict[torch.Size, tuple] = {}

    def views(self, shape: torch.Size) -> tuple:
        if shape not in self.shapes:  # every chunk but the last has the same shape
            batch, classes, length = shape
            size = shape.numel()
            flat = [b[:size] for b in self.buffers]
            values = self.values[: batch * (2 * classes + 1) * length].view(batch, 2 * classes + 1, length)
            flag = self.flag[: batch * length].view(batch, 1, length)
            self.shapes[shape] = ([f.view(shape) for f in flat], flat, values, flag)
        return self.shapes[shape]


def _region_pairs(column: Tensor) -> tuple[Tensor, Tensor]:
    """``(R, 2)`` values (columns boundary, interior) as ``(1, R, 1)``: interior and boundary - interior."""
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
        if linear_quadratic:
            table = torch.cat([table[: 2 * classes] / norm, table[2 * classes :]])
        value_in, value_step = _region_pairs(table)  # (1, 2C + 1, 1): lambda_k, rho_k, the target's scale
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        tensors = [logits, terms.onehot, terms.boundary, terms.counts, terms.valid, grad]
        chunks = _chunks(tensors, voxels, classes, logits.device)
        workspace = _Workspace(logits, max(c[0].numel() for c in chunks), classes)
        nll_parts: list[Tensor] = []
        linear_parts: list[Tensor] = []  # sum lam |gap| (linear_quadratic)
        square_parts: list[Tensor] = []  # sum (lam |gap| + rho gap^2) (linear_quadratic) or sum P
        for z, onehot, boundary, counts, valid, out in chunks:
            (work, log_p, buf), (work_flat, log_p_flat, buf_flat), values, flag = workspace.views(z.shape)
            lam, rho, scale = values[:, :classes], values[:, classes : 2 * classes], values[:, 2 * classes :]
            if not z.is_contiguous():  # log_softmax would copy it into a fresh tensor
                z = work.copy_(z)
            torch._log_softmax(z, 1, False, out=log_p)
            buf.copy_(onehot)  # 0 on ignored voxels
            nll_parts.append(torch.dot(log_p_flat, buf_flat))
            error = log_p.exp_().sub_(buf)  # softmax - onehot
            if valid is not None:
                error.mul_(valid)
            torch.mul(flag.copy_(boundary), value_step, out=values).add_(value_in)  # each voxel's region's values
            gap = torch.addcmul(z, buf.copy_(counts), scale, value=-1, out=work)  # z - target
            if valid is not None:
                gap.mul_(valid)  # ignored voxels: gap 0, so P(0) = 0 and no gradient
            if linear_quadratic:  # P = lam |gap| + rho gap^2 / 2 = (lam |gap| + dP/dz gap) / 2
                slope = torch.sign(gap, out=buf).mul_(lam)
                linear_parts.append(torch.dot(buf_flat, work_flat))
                change = slope.addcmul_(rho, gap)  # dP/dz = lam sign(gap) + rho gap
                square_parts.append(torch.dot(buf_flat, work_flat))
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
