"""Voxel spacing arguments (mm per voxel, one value per spatial axis in the tensor's axis order)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

SpacingLike = float | int | Sequence[float] | np.ndarray | torch.Tensor | None
BatchSpacingLike = SpacingLike | Sequence[Sequence[float]]


def normalize_spacing(spacing: SpacingLike, ndim: int) -> tuple[float, ...]:
    """Return ``spacing`` as a tuple of ``ndim`` positive floats (mm).

    Args:
        spacing: ``None`` (1 mm), one number (isotropic) or one number per spatial axis.
        ndim: number of spatial axes (2 or 3).
    """
    if spacing is None:
        return (1.0,) * ndim
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.detach().cpu().tolist()
    if isinstance(spacing, np.ndarray):
        spacing = spacing.tolist()
    if isinstance(spacing, (int, float)):
        values = (float(spacing),) * ndim
    else:
        values = tuple(float(s) for s in spacing)
    if len(values) != ndim:
        raise ValueError(f"spacing {spacing!r} must have one value per spatial axis ({ndim})")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing values must be finite and > 0, got {spacing!r}")
    return values


def spacing_per_case(spacing: BatchSpacingLike, batch_size: int, ndim: int) -> list[tuple[float, ...]]:
    """Expand a batch spacing argument to one ``ndim``-tuple per case.

    Args:
        spacing: ``None``, one number, one sequence of ``ndim`` numbers shared by the batch, or a
            sequence of ``batch_size`` such per-case values.
        batch_size: number of cases ``B``.
        ndim: number of spatial axes.
    """
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.detach().cpu().tolist()
    if isinstance(spacing, np.ndarray):
        spacing = spacing.tolist()
    if (
        isinstance(spacing, Sequence)
        and len(spacing) > 0
        and all(isinstance(s, (Sequence, np.ndarray, torch.Tensor)) for s in spacing)
    ):
        if len(spacing) != batch_size:
            raise ValueError(f"per-case spacing has {len(spacing)} entries for a batch of {batch_size}")
        return [normalize_spacing(s, ndim) for s in spacing]
    shared = normalize_spacing(spacing, ndim)
    return [shared] * batch_size


def spacing_from_affine(affine: np.ndarray | torch.Tensor) -> tuple[float, ...]:
    """Voxel size in mm along each voxel axis: the norms of the affine's direction columns."""
    matrix = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    n = matrix.shape[0] - 1
    return tuple(float(v) for v in np.linalg.norm(matrix[:n, :n], axis=0))
