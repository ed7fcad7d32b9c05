"""CE plus CRaC's region- and class-wise constraint penalty in one pass over the logits.

The value and the gradient are computed together in the forward (the gradient of both terms is
elementwise), in chunks of voxels small enough that a chunk's ~15 elementwise steps run in cache
on the CPU; the backward only scales the saved gradient. Everything label-derived (window counts,
region, weights) is prepared once per batch, without gradient, by the caller (:class:`ConstraintTerms`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from segcalib.losses._penalties import PHR, Penalty

CHUNK_ELEMENTS = 1 << 16
"""Logit entries per chunk on the CPU (256 KiB of float32): the chunk's temporaries stay in cache."""


@dataclass(frozen=True)
class ConstraintTerms:
    """Label-derived inputs of :class:`ConstrainedCrossEntropy`, ``N`` voxels flattened.

    Attributes:
        labels: ``(B, 1, N)`` int64, ignored voxels set to 0.
        weight: ``(B, 1, N)`` ``valid / count`` in the logits' dtype (the mean's weights).
        regions: ``(B, 2, N)`` one-hot region of each voxel, logits' dtype: row 0 the boundary
            region, row 1 every other voxel (ignored ones included; their gap is zeroed).
        counts: ``(B, C, N)`` integer window counts (:func:`segcalib.losses._filters.window_counts`).
        goal_scale: ``(B, 1, N)``: the logits' target is ``counts * goal_scale`` (``1/k^d`` on the
            boundary, ``m/k^d`` elsewhere).
        valid: ``(B, 1, N)`` 1.0 on valid voxels, 0.0 on ignored ones, or None when none is ignored.
    """

    labels: Tensor
    weight: Tensor
    regions: Tensor
    counts: Tensor
    goal_scale: Tensor
    valid: Tensor | None


def _chunks(tensors: list[Tensor | None], voxels: int, classes: int, device: torch.device) -> list[tuple]:
    """Matching pieces of ``(B, *, N)`` tensors (None stays None): the whole batch at once on
    accelerators, one sample and ``CHUNK_ELEMENTS // C`` voxels at a time on the CPU."""
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


class ConstrainedCrossEntropy(torch.autograd.Function):
    """``(ce + penalty, ce, penalty)`` of ``(B, C, N)`` logits; only the first output has a gradient.

    ``ce`` = mean NLL over valid voxels; ``penalty`` = ``sum_{valid i, k} P(|g_ik - z_ik|; lam_ik,
    rho_ik) / norm`` with ``g = counts * goal_scale`` and ``lam``/``rho`` the ``(2, C)`` tables' row of
    the voxel's region. Gradient: ``(softmax - onehot) * weight + sign(z - g) P'(h) / norm``. For PHR
    with ``lam >= 0``, ``rho > 0`` (always, by the multiplier schedule) and ``h >= 0`` the penalty is
    ``lam h + rho h^2 / 2`` and its gradient ``lam sign(z - g) + rho (z - g)``: computed so, with the
    tables scaled by ``1 / norm`` first; other penalties use their ``value`` and ``derivative``.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, terms: ConstraintTerms, lambdas: Tensor, rhos: Tensor,  # type: ignore[override]
                penalty: Penalty, norm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        classes, voxels = logits.shape[1:]
        lambdas, rhos = lambdas.to(logits), rhos.to(logits)
        fast = isinstance(penalty, PHR) and bool((lambdas >= 0).all() & (rhos > 0).all())
        # (2C, 2): column r holds region r's multipliers, then its penalty parameters
        table = torch.cat([lambdas.t(), rhos.t()]) / norm if fast else torch.cat([lambdas.t(), rhos.t()])
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        nll_parts: list[Tensor] = []
        linear_parts: list[Tensor] = []  # sum lam |gap|
        square_parts: list[Tensor] = []  # sum rho gap^2 (PHR) or sum P (other penalties)
        tensors = [logits, terms.labels, terms.weight, terms.weight.neg(), terms.regions, terms.counts,
                   terms.goal_scale, terms.valid, grad]  # fmt: skip
        for z, labels, weight, neg_weight, regions, counts, goal_scale, valid, out in _chunks(
            tensors, voxels, classes, logits.device
        ):
            log_p = torch.log_softmax(z, 1)
            nll_parts.append(torch.dot(log_p.gather(1, labels).reshape(-1), weight.reshape(-1)))
            gap = torch.addcmul(z, counts, goal_scale, value=-1)  # z - goal
            if valid is not None:
                gap.mul_(valid)  # ignored voxels: gap 0, so P(0) = 0 and no gradient
            per_voxel = torch.matmul(table, regions)  # (B', 2C, L): each voxel's region column
            lam, rho = per_voxel[:, :classes], per_voxel[:, classes:]
            if fast:  # P = lam |gap| + rho gap^2 / 2; dP/dz = lam sign(gap) + rho gap
                slope = lam.mul_(torch.sign(gap))
                linear_parts.append(torch.dot(slope.reshape(-1), gap.reshape(-1)))
                step = rho.mul_(gap)
                square_parts.append(torch.dot(step.reshape(-1), gap.reshape(-1)))
                step.add_(slope)
            else:
                h = gap.abs()
                square_parts.append(penalty.value(h.clone(), lam, rho).sum())
                step = penalty.derivative(h, lam, rho).mul_(torch.sign(gap)).div_(norm)
            if out is not None:
                torch.addcmul(step, log_p.exp_(), weight, out=out)
                out.scatter_add_(1, labels, neg_weight)
        ce = -torch.stack(nll_parts).sum()
        if fast:
            penalty_value = torch.stack(linear_parts).sum() + torch.stack(square_parts).sum() / 2
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
