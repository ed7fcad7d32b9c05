"""The Triton path of MbLS and CALS: loss and gradient in one kernel (one read of the logits, one
write of the gradient).

The loss is ``(sum_valid CE_i + w * sum_valid sum_k P(h_ik)) / count`` with ``w = alpha / C``
(MbLS) or ``1 / C`` (CALS) and ``h_ik = (max_j z_ij - z_ik - m) * s`` (see
:mod:`segcalib.losses._margin_ce` for the torch path it equals). A program holds ``BLOCK_N`` voxels
x all classes of one case in registers: it computes the max, the log-sum-exp, the NLL and the
penalty, writes the per-block sums, and writes the gradient of the loss for a unit output
``(softmax - onehot + w (-P'(h) + [z == max] sum_j P'(h_j) / n_max)) / count`` (the gradient of
the max shared evenly among tied maxima, as ``torch.amax`` does), in the logits' own dtype, so
bf16 logits are read and written as bf16 and computed in float32. Backward only multiplies that
gradient by the incoming one (exact for 1 and for the powers of two of a gradient scaler).

Half-precision logits are read as they come (no float32 copy). Labels must lie in ``[0, C)`` or
equal ``ignore_index``; as on the torch path on CUDA they are not checked on the host. Under
``TRITON_INTERPRET=1`` the kernel runs on CPU tensors through Triton's interpreter (how the tests
compare it with the torch path); the kernel is built on first use for the interpreter setting.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from segcalib.losses._penalties import P2, P3, PHR, Margin, Penalty

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is missing
    triton = None
    tl = None

BLOCK_VOXELS = 256  # voxels per program at up to 4 classes (untuned: no GPU has run it yet)
MAX_CLASSES = 64  # a (classes x voxels) tile per program; more classes go to the torch path
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PENALTY_IDS = {Margin: 0, PHR: 1, P2: 2, P3: 3}  # the penalty formulas the kernel knows


def triton_available() -> bool:
    """Whether Triton imports (the kernel then runs on CUDA tensors, or anywhere interpreted)."""
    return triton is not None


def kernel_supports(logits: Tensor, penalty: Penalty) -> bool:
    """Whether the kernel computes this case: float32/float16/bfloat16 logits, at most
    ``MAX_CLASSES`` classes, and one of the penalties of :mod:`segcalib.losses._penalties`."""
    return (
        triton is not None
        and logits.dtype in KERNEL_DTYPES
        and logits.shape[1] <= MAX_CLASSES
        and type(penalty) in _PENALTY_IDS
    )


def _interpreting() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)


def _margin_ce_kernel(
    logits, target, lam_ptr, rho_ptr, count_ptr, grad, partials,
    n_vox, n_blocks, ignore_index, margin, scale, pen_weight,
    stride_zb, stride_zc, stride_zn, stride_tb, stride_tn, stride_gb, stride_gc, stride_gn,
    N_CLASSES: tl.constexpr, BLOCK_C: tl.constexpr, PENALTY: tl.constexpr, WRITE_GRAD: tl.constexpr,
    OUT_BF16: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: ``BLOCK_N`` voxels x all classes of case ``program_id(1)``."""
    case = tl.program_id(1).to(tl.int64)
    block = tl.program_id(0)
    offs = block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cls = tl.arange(0, BLOCK_C)
    in_vox = offs < n_vox
    in_cls = cls < N_CLASSES
    tile = in_cls[:, None] & in_vox[None, :]

    label = tl.load(target + case * stride_tb + offs * stride_tn, mask=in_vox, other=ignore_index)
    valid = in_vox & (label != ignore_index)
    z_ptrs = logits + case * stride_zb + cls[:, None].to(tl.int64) * stride_zc + offs[None, :] * stride_zn
    z = tl.load(z_ptrs, mask=tile, other=0.0).to(tl.float32)
    z = tl.where(in_cls[:, None], z, -float("inf"))  # padding classes drop out of max and softmax

    zmax = tl.max(z, axis=0)
    e = tl.exp(z - zmax[None, :])
    sum_e = tl.sum(e, axis=0)
    lse = tl.log(sum_e) + zmax
    onehot = cls[:, None] == label.to(tl.int32)[None, :]
    nll = lse - tl.sum(tl.where(onehot, z, 0.0), axis=0)

    # h = (max - m - z) * s; lam, rho per class (1 for the margin penalty, which ignores them)
    pen_tile = in_cls[:, None] & valid[None, :]
    h = tl.where(in_cls[:, None], ((zmax - margin)[None, :] - z) * scale, 0.0)
    lam = tl.load(lam_ptr + cls, mask=in_cls, other=1.0)[:, None]
    rho = tl.load(rho_ptr + cls, mask=in_cls, other=1.0)[:, None]
    if PENALTY == 0:  # margin: relu(h)
        value = tl.maximum(h, 0.0)
        slope = tl.where(h > 0.0, 1.0, 0.0)
    elif PENALTY == 1:  # PHR: (max(lam + rho h, 0)^2 - lam^2) / (2 rho)
        x = tl.maximum(lam + rho * h, 0.0)
        value = (x * x - lam * lam) / (2.0 * rho)
        slope = x
    else:  # P2 / P3: h < 0 branch lam h / (1 - rho h), evaluated at min(h, 0)
        inverse = 1.0 / (1.0 - rho * tl.minimum(h, 0.0))
        neg_value = (lam / rho) * (inverse - 1.0)
        neg_slope = lam * inverse * inverse
        if PENALTY == 2:
            pos_value = h * (lam + h * (lam * rho + h * (rho * rho / 6.0)))
            pos_slope = lam + h * (2.0 * lam * rho + h * (rho * rho / 2.0))
        else:
            pos_value = h * lam * (1.0 + rho * h)
            pos_slope = lam * (1.0 + 2.0 * rho * h)
        value = tl.where(h >= 0.0, pos_value, neg_value)
        slope = tl.where(h >= 0.0, pos_slope, neg_slope)
    value = tl.where(pen_tile, value, 0.0)

    first = (case * n_blocks + block) * 2
    tl.store(partials + first, tl.sum(tl.where(valid, nll, 0.0), axis=0))
    tl.store(partials + first + 1, tl.sum(tl.sum(value, axis=1), axis=0))
    if WRITE_GRAD:
        inv_count = 1.0 / tl.load(count_ptr)
        slope = tl.where(pen_tile, slope * scale, 0.0)  # dP(s u)/du
        is_max = z == zmax[None, :]
        n_max = tl.sum(is_max.to(tl.float32), axis=0)
        to_max = tl.sum(slope, axis=0) / n_max
        g_pen = tl.where(is_max, to_max[None, :], 0.0) - slope
        g_ce = e / sum_e[None, :] - tl.where(onehot, 1.0, 0.0)
        g = tl.where(valid[None, :], (g_ce + pen_weight * g_pen) * inv_count, 0.0)
        g_ptrs = grad + case * stride_gb + cls[:, None].to(tl.int64) * stride_gc + offs[None, :] * stride_gn
        if OUT_BF16:
            # round to nearest even on the bits (finite values), as torch and the GPU's conversion do;
            # Triton's interpreter truncates in .to(tl.bfloat16), which would make the CPU test moot
            bits = g.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
            tl.store(g_ptrs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=tile)
        else:
            tl.store(g_ptrs, g.to(grad.dtype.element_ty), mask=tile)


@lru_cache(maxsize=2)
def _kernel(interpret: bool):
    """The jitted kernel for the interpreter setting in force (Triton reads it when jitting)."""
    return triton.jit(_margin_ce_kernel)


def _block_voxels(n_classes: int) -> int:
    """Voxels per program: a tile of about ``BLOCK_VOXELS x 4`` entries (at least 16 voxels)."""
    padded = triton.next_power_of_2(n_classes)
    return max(16, BLOCK_VOXELS * 4 // max(padded, 4))


class _FusedMarginCrossEntropy(torch.autograd.Function):
    """Returns ``(loss, sums)``: the loss (differentiable) and ``(sum_valid CE, sum_valid sum_k P)``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: Tensor,
        target: Tensor,
        count: Tensor,
        lam: Tensor,
        rho: Tensor,
        penalty_id: int,
        margin: float,
        scale: float,
        pen_weight: float,
        ignore_index: int,
    ) -> tuple[Tensor, Tensor]:
        z = logits.flatten(2)  # (B, C, N), a view for contiguous and channels-last logits
        labels = target.flatten(1)
        batch, n_classes, n_vox = z.shape
        block_n = _block_voxels(n_classes)
        n_blocks = max(triton.cdiv(n_vox, block_n), 1)
        partials = torch.empty(batch * n_blocks, 2, dtype=torch.float32, device=z.device)
        write_grad = bool(ctx.needs_input_grad[0])
        grad = torch.empty_like(z) if write_grad else z  # z: a placeholder pointer, never written
        _kernel(_interpreting())[(n_blocks, batch)](
            z, labels, lam, rho, count, grad, partials,
            n_vox, n_blocks, ignore_index, margin, scale, pen_weight,
            *z.stride(), *labels.stride(), *grad.stride(),
            N_CLASSES=n_classes, BLOCK_C=triton.next_power_of_2(n_classes), PENALTY=penalty_id,
            WRITE_GRAD=write_grad, OUT_BF16=z.dtype == torch.bfloat16, BLOCK_N=block_n, num_warps=4,
        )  # fmt: skip
        sums = partials.sum(0, dtype=torch.float64).to(count.dtype)
        loss = (sums[0] + pen_weight * sums[1]) / count
        ctx.grad = grad.view(logits.shape) if write_grad else None
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor, grad_sums: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        # a new tensor, not an in-place product: backward may run again under retain_graph
        return (ctx.grad * grad_loss,) + (None,) * 9


def fused_margin_cross_entropy(
    logits: Tensor,
    target: Tensor,
    count: Tensor,
    penalty: Penalty,
    margin: float,
    scale: float,
    lam: Tensor | None,
    rho: Tensor | None,
    weight: float,
    ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, ce, penalty)`` with ``loss = ce + weight * penalty``: ``ce`` the mean NLL over the
    ``count`` valid voxels, ``penalty = mean_{i,k} P(h_ik; lam_k, rho_k)`` over valid voxels x
    classes. ``logits`` ``(B, C, *spatial)`` (float32/16, bfloat16), ``target`` ``(B, *spatial)``
    int64 holding ``ignore_index`` on ignored voxels, ``count`` a 0-d float32 tensor (>= 1),
    ``lam``/``rho`` ``(C,)`` or None. Only ``loss`` carries a gradient (the parts are for logging)."""
    if not kernel_supports(logits, penalty):
        raise ValueError(f"the fused Triton loss does not handle {logits.dtype} logits {tuple(logits.shape)} "
                         f"with the {type(penalty).__name__} penalty")  # fmt: skip
    n_classes = logits.shape[1]
    ones = torch.ones(n_classes, dtype=torch.float32, device=logits.device) if lam is None or rho is None else None
    lam = ones if lam is None else lam.to(device=logits.device, dtype=torch.float32).contiguous()
    rho = ones if rho is None else rho.to(device=logits.device, dtype=torch.float32).contiguous()
    loss, sums = _FusedMarginCrossEntropy.apply(
        logits, target, count, lam, rho, _PENALTY_IDS[type(penalty)],
        float(margin), float(scale), float(weight) / n_classes, int(ignore_index),
    )  # fmt: skip
    return loss, sums[0] / count, sums[1] / (count * n_classes)
