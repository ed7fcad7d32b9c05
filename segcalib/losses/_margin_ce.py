"""Cross-entropy plus a penalty on the logit distances, fused into one autograd function.

MbLS and CALS both add ``mean_{i,k} P(h_ik)`` with ``h_ik = (max_j z_ij - z_ik - m) * s`` to the
cross-entropy. Written with autograd ops, every step keeps its own ``(M, C)`` tensor for backward
and the gradients of CE and penalty are summed at the end. Here forward keeps one ``(M, C)``
scratch buffer (as much memory as ``F.cross_entropy`` keeps for its log-softmax) and backward
writes the gradient of both terms into one new tensor, recomputing what it needs from the logits.
Ignored voxels get ``u = d - m = -inf`` (penalty slope 0) and ``lse = +inf`` (softmax 0) instead of
a multiplication by the mask. The gradient of ``max_j z_ij`` is shared evenly among tied maxima,
as ``torch.amax`` does (ties are common with bf16 logits)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from segcalib.losses._inputs import LossInputs
from segcalib.losses._penalties import Penalty

_TRITON_FAILED: list[str] = []  # why the fused Triton kernel failed in this process, if it did


def logit_constraints(logits: Tensor, zmax: Tensor, margin: float, scale: float, out: Tensor | None = None) -> Tensor:
    """``h = (max_j z_j - z - margin) * scale`` for ``(B, C, *spatial)`` logits (``zmax`` is their amax over C)."""
    h = torch.sub(zmax - margin, logits, out=out)
    return h if scale == 1.0 else h.mul_(scale)


class _CrossEntropyDistancePenalty(torch.autograd.Function):
    """Returns ``(sum_valid CE_i, sum_valid sum_k P(h_ik))``; see the module docstring."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: Tensor,
        labels: Tensor,
        valid: Tensor,
        lam: Tensor | None,
        rho: Tensor | None,
        penalty: Penalty,
        margin: float,
        scale: float,
    ) -> tuple[Tensor, Tensor]:
        zmax = logits.amax(1, keepdim=True)
        scratch = torch.sub(logits, zmax).exp_()
        lse = scratch.sum(1, keepdim=True).log_().add_(zmax)
        valid = valid.unsqueeze(1)
        nll = lse - logits.gather(1, labels.unsqueeze(1))
        ce_sum = torch.where(valid, nll, 0).sum()

        # u = d - m, and -inf on ignored voxels (their penalty value is finite and left out, their slope 0)
        u = torch.sub(torch.where(valid, zmax - margin, -torch.inf), logits, out=scratch)
        penalty_sum = torch.where(valid[:, 0], penalty.class_sum(u, lam, rho, scale), 0).sum()

        ctx.save_for_backward(logits, labels, valid, zmax, lse, lam, rho)
        ctx.scratch = scratch  # reused by backward, which rewrites it from the logits each time
        ctx.penalty, ctx.margin, ctx.scale = penalty, margin, scale
        return ce_sum, penalty_sum

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_ce: Tensor, grad_penalty: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        logits, labels, valid, zmax, lse, lam, rho = ctx.saved_tensors
        scratch = ctx.scratch
        # cross-entropy: softmax - onehot on valid voxels; ignored voxels get lse = +inf, hence softmax 0
        grad = torch.sub(logits, torch.where(valid, lse, torch.inf)).exp_().mul_(grad_ce)
        grad.scatter_add_(1, labels.unsqueeze(1), torch.where(valid, -grad_ce, 0))

        # penalty: du_ik/dz_ik = -1 and du_ik/d(max_j z_ij) = +1, shared evenly among tied maxima
        u = torch.sub(torch.where(valid, zmax - ctx.margin, -torch.inf), logits, out=scratch)
        slope = ctx.penalty.slope(u, lam, rho, ctx.scale)
        grad.addcmul_(slope, -grad_penalty)
        to_max = slope.sum(1, keepdim=True).mul_(grad_penalty)
        is_max = torch.eq(logits, zmax, out=scratch)
        grad.addcmul_(is_max, to_max.div_(is_max.sum(1, keepdim=True)))
        return (grad,) + (None,) * 7


def per_class(values: Tensor, like: Tensor) -> Tensor:
    """A ``(C,)`` tensor shaped ``(1, C, 1, ...)`` to broadcast against ``like`` ``(B, C, *spatial)``, on its device and dtype."""
    return values.to(device=like.device, dtype=like.dtype).reshape((1, -1) + (1,) * (like.dim() - 2))


def cross_entropy_with_penalty(
    inputs: LossInputs,
    penalty: Penalty,
    margin: float,
    scale: float = 1.0,
    lam: Tensor | None = None,
    rho: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean CE and ``mean_{i,k} P(h_ik; lam_k, rho_k)`` over valid voxels x classes.

    ``lam`` and ``rho`` are ``(C,)`` tensors (or None for penalties without them).
    """
    lam = None if lam is None else per_class(lam, inputs.logits)
    rho = None if rho is None else per_class(rho, inputs.logits)
    ce_sum, penalty_sum = _CrossEntropyDistancePenalty.apply(
        inputs.logits,
        inputs.labels,
        inputs.valid,
        lam,
        rho,
        penalty,
        float(margin),
        float(scale),
    )
    return ce_sum / inputs.count, penalty_sum / (inputs.count * inputs.num_classes)


def fused_backend(logits: Tensor, penalty: Penalty) -> str:
    """``"triton"`` (the fused kernel of :mod:`segcalib.losses._margin_ce_triton`) for CUDA logits
    it handles when Triton imports, until it fails once in this process; ``"torch"`` otherwise
    (always on CPU, where the function above is the faster path)."""
    if logits.device.type != "cuda" or _TRITON_FAILED or logits.numel() == 0:
        return "torch"
    from segcalib.losses._margin_ce_triton import kernel_supports

    return "triton" if kernel_supports(logits, penalty) else "torch"


def penalised_cross_entropy(
    inputs: LossInputs,
    penalty: Penalty,
    margin: float,
    scale: float = 1.0,
    lam: Tensor | None = None,
    rho: Tensor | None = None,
    weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, ce, penalty)`` with ``loss = ce + weight * penalty`` (the parts of
    :func:`cross_entropy_with_penalty`), by the backend :func:`fused_backend` picks. On the Triton
    path loss and gradient come from one kernel and only ``loss`` carries a gradient."""
    if fused_backend(inputs.source_logits, penalty) == "triton":
        from segcalib.losses._margin_ce_triton import fused_margin_cross_entropy

        try:
            return fused_margin_cross_entropy(
                inputs.source_logits, inputs.target, inputs.count, penalty, margin, scale, lam, rho, weight,
                inputs.ignore_index,
            )  # fmt: skip
        except torch.cuda.OutOfMemoryError:
            raise  # the torch path needs more memory, not less
        except Exception as err:  # a kernel that fails to build must not stop a training run
            _TRITON_FAILED.append(repr(err))
            warnings.warn(f"the fused Triton MbLS/CALS kernel failed ({err!r}); using torch ops from now on", stacklevel=2)
    ce, pen = cross_entropy_with_penalty(inputs, penalty, margin, scale, lam, rho)
    return (ce + pen if weight == 1.0 else ce + weight * pen), ce, pen
