"""CE plus CRaC's region- and class-wise constraint penalty in one pass over the logits.

The value and the gradient are computed together in the forward (the gradient of both terms is
elementwise), on a one-thread CPU in chunks of voxels small enough that a chunk's ~15 elementwise
steps run near the cache (one chunk on accelerators and with several threads); the backward only
scales the saved gradient. Everything
label-derived (one-hot, window counts, regions) is prepared once per batch, without gradient, by
the caller (:class:`ConstraintTerms`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from segcalib.losses._penalties import PHR, Penalty

CHUNK_ELEMENTS = 1 << 17
"""Logit entries per chunk on the CPU (512 KiB of float32): few Python steps, temporaries near the cache
(2^16 and 2^17 were the fastest at 2 x 4 x 64^3 on one thread, 2^18 slower)."""


@dataclass(frozen=True)
class ConstraintTerms:
    """Label-derived inputs of :class:`ConstrainedCrossEntropy`, ``N`` voxels flattened.

    Attributes:
        onehot: ``(B, C, N)`` uint8 one-hot labels, all 0 on ignored voxels.
        regions: ``(B, 2, N)`` in the logits' dtype: row 0 is 1.0 on the boundary region (valid
            voxels only) and 0.0 elsewhere, row 1 is all ones (so that ``[diff | interior] @ regions``
            gives each voxel its region's value).
        counts: ``(B, C, N)`` integer window counts (:func:`segcalib.losses._filters.window_counts`).
        count: the number of valid voxels (at least 1).
        valid: ``(B, 1, N)`` 1.0 on valid voxels, 0.0 on ignored ones, or None when none is ignored.
    """

    onehot: Tensor
    regions: Tensor
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


def _region_values(table: Tensor, regions: Tensor) -> Tensor:
    """``(R, 2)`` columns (boundary - interior, interior) -> ``(B', R, L)`` values of every voxel's region."""
    if regions.shape[0] == 1:
        return torch.mm(table, regions[0]).unsqueeze(0)
    return torch.matmul(table, regions)


class ConstrainedCrossEntropy(torch.autograd.Function):
    """``(ce + penalty, ce, penalty)`` of ``(B, C, N)`` logits; only the first output has a gradient.

    ``ce`` = mean NLL over the valid voxels; ``penalty`` = ``sum_{valid i, k} P(|g_ik - z_ik|;
    lam_ik, rho_ik) / norm`` with the targets ``g = counts * scale`` and ``lam``, ``rho``, ``scale``
    the values of the voxel's region (``table`` ``(2C + 1, 2)``: rows lambda_k, rho_k, then the
    target scale; columns boundary, interior). Gradient: ``(softmax - onehot) [valid] / count +
    sign(z - g) P'(h) / norm``. For PHR with ``lam >= 0``, ``rho > 0`` (always, by the multiplier
    schedule) and ``h >= 0`` the penalty is ``lam h + rho h^2 / 2`` and its gradient
    ``lam sign(z - g) + rho (z - g)``: computed so, with the multipliers scaled by ``1 / norm``
    first; other penalties use their ``value`` and ``derivative``.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, terms: ConstraintTerms, table: Tensor, penalty: Penalty,  # type: ignore[override]
                norm: float) -> tuple[Tensor, Tensor, Tensor]:
        classes, voxels = logits.shape[1:]
        table = table.to(logits)
        multipliers = table[: 2 * classes]
        lambdas_ok = (multipliers[:classes] >= 0).all() & (multipliers[classes:] > 0).all()
        fast = isinstance(penalty, PHR) and bool(lambdas_ok)
        if fast:
            table = torch.cat([multipliers / norm, table[2 * classes :]])
        columns = torch.stack([table[:, 0] - table[:, 1], table[:, 1]], 1)  # (boundary - interior, interior)
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        weight = None if terms.valid is None else terms.valid / terms.count
        nll_parts: list[Tensor] = []
        linear_parts: list[Tensor] = []  # sum lam |gap| (PHR)
        square_parts: list[Tensor] = []  # sum (lam |gap| + rho gap^2) (PHR) or sum P (other penalties)
        tensors = [logits, terms.onehot, terms.regions, terms.counts, terms.valid, weight, grad]
        for z, onehot, regions, counts, valid, w, out in _chunks(tensors, voxels, classes, logits.device):
            log_p = torch.log_softmax(z, 1)
            onehot = onehot.to(logits.dtype)  # 0 on ignored voxels
            nll_parts.append(torch.dot(log_p.reshape(-1), onehot.reshape(-1)))
            values = _region_values(columns, regions)  # (B', 2C + 1, L): lambda, rho, target scale
            lam, rho = values[:, :classes], values[:, classes : 2 * classes]
            gap = torch.addcmul(z, counts, values[:, 2 * classes :], value=-1)  # z - target
            if valid is not None:
                gap.mul_(valid)  # ignored voxels: gap 0, so P(0) = 0 and no gradient
            if fast:  # P = lam |gap| + rho gap^2 / 2 = (lam |gap| + dP/dz gap) / 2; dP/dz = lam sign(gap) + rho gap
                slope = lam.mul_(torch.sign(gap))
                linear_parts.append(torch.dot(slope.reshape(-1), gap.reshape(-1)))
                change = torch.addcmul(slope, rho, gap, out=rho)
                square_parts.append(torch.dot(change.reshape(-1), gap.reshape(-1)))
            else:
                h = gap.abs()
                square_parts.append(penalty.value(h.clone(), lam, rho).sum())
                change = penalty.derivative(h, lam, rho).mul_(torch.sign(gap)).div_(norm)
            if out is not None:  # CE: (softmax - onehot) [valid] / count; the one-hot is 0 where not valid
                error = log_p.exp_().sub_(onehot)
                if w is None:
                    torch.add(change, error, alpha=1 / terms.count, out=out)
                else:
                    torch.addcmul(change, error, w, out=out)
        ce = -torch.stack(nll_parts).sum() / terms.count
        if fast:
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
            return grad, None, None, None, None  # loss.backward(): the gradient as computed
        return grad * grad_total, None, None, None, None
