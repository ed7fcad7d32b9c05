"""Shape helpers for the ``(B, C, *spatial)`` / ``(B, *spatial)`` convention used everywhere."""

from __future__ import annotations

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)  # promoted to float32 before any reduction


def as_label_map(target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Return ``target`` as an int64 ``(B, *spatial)`` label map matching ``reference`` ``(B, C, *spatial)``.

    Accepts ``(B, *spatial)`` or ``(B, 1, *spatial)`` targets of any integer dtype, or of a float
    dtype holding whole numbers (MONAI loads labels as floats); floats are rounded, not truncated,
    so that a label resampled to 0.9999 stays 1.
    """
    spatial = reference.shape[2:]
    if target.dim() == reference.dim() and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape[0] != reference.shape[0] or target.shape[1:] != spatial:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match (B, *spatial) = "
            f"{(reference.shape[0], *spatial)} of the prediction {tuple(reference.shape)}"
        )
    return target.round().long() if target.is_floating_point() else target.long()


def flatten_classes(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(M, C)`` with one row per voxel (M = B * prod(spatial))."""
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def not_equal(x: torch.Tensor, value: int) -> torch.Tensor:
    """Boolean ``x != value`` for an integer tensor: ``(x ^ value) != 0`` by a bitwise XOR and a cast to
    bool, both vectorised on the CPU, where ATen's comparison with a scalar operand is not (~10x slower
    for uint8)."""
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        return x != value
    return (x if value == 0 else torch.bitwise_xor(x, value)).bool()
