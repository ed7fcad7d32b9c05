"""Regions of the ground truth on which calibration is measured (SPEC §3), as a small registry.

- ``all``: every (non-ignored) voxel.
- ``foreground``: voxels whose ground-truth class is not background (class 0) -- the seed papers'
  region.
- ``boundary``: voxels whose Euclidean distance (mm, with the voxel spacing, centre to centre) to
  the nearest edge voxel of any ground-truth foreground class is at most ``boundary_mm``, on both
  sides of the boundary, edge voxels included. Edge voxels of class k are
  ``mask_k XOR binary_erosion(mask_k)`` with the cross element, voxels outside the image counting
  as background (so foreground touching the image border has edge voxels there).

No public tool defines a boundary-band ECE; this band is segcalib's own. It is computed exactly as a
dilation of the edge voxels by the ellipsoid ``{o : |o * spacing| <= boundary_mm}`` (equal to
``distance_transform_edt(~edges, sampling=spacing) <= boundary_mm``), on the input's device.

A new region is one function plus ``@register_region("name")``; it receives a
:class:`RegionContext` and returns a boolean ``(B, *spatial)`` mask (or ``None`` for every voxel).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from segcalib.spatial.morphology import bounding_box, dilate_ellipsoid, label_edges


@dataclass(frozen=True)
class RegionContext:
    """What a region function may look at.

    Attributes:
        target: int64 label map ``(B, *spatial)``.
        spacing: one tuple of mm per spatial axis for each case.
        num_classes: number of classes ``C``.
        boundary_mm: half-width of the boundary band in mm.
        ignore_index: label value of ignored voxels, or ``None``.
    """

    target: torch.Tensor
    spacing: Sequence[tuple[float, ...]]
    num_classes: int
    boundary_mm: float = 2.0
    ignore_index: int | None = None

    def foreground(self) -> torch.Tensor:
        """Boolean ``(B, *spatial)``: ground truth not background and not ignored."""
        fg = self.target != 0
        if self.ignore_index is not None:
            fg &= self.target != self.ignore_index
        return fg


RegionFn = Callable[[RegionContext], "torch.Tensor | None"]
_REGIONS: dict[str, RegionFn] = {}


def register_region(name: str) -> Callable[[RegionFn], RegionFn]:
    """Decorator adding a region function to the registry under ``name``."""

    def wrap(fn: RegionFn) -> RegionFn:
        if name in _REGIONS:
            raise ValueError(f"region {name!r} is already registered")
        _REGIONS[name] = fn
        return fn

    return wrap


def available_regions() -> list[str]:
    """Names of the registered regions."""
    return list(_REGIONS)


def region_mask(name: str, context: RegionContext) -> torch.Tensor | None:
    """Boolean ``(B, *spatial)`` mask of region ``name`` (``None`` means every voxel)."""
    if name not in _REGIONS:
        raise ValueError(f"unknown region {name!r}; available: {', '.join(_REGIONS)}")
    return _REGIONS[name](context)


@register_region("all")
def _all(context: RegionContext) -> torch.Tensor | None:
    return None


@register_region("foreground")
def _foreground(context: RegionContext) -> torch.Tensor:
    return context.foreground()


@register_region("boundary")
def _boundary(context: RegionContext) -> torch.Tensor:
    labels = context.target
    small = context.num_classes < 2**15 and (
        context.ignore_index is None or -(2**15) <= context.ignore_index < 2**15
    )
    if small:  # label comparisons on int16 read 4x less memory than on int64
        labels = labels.to(torch.int16)
    fg = context.foreground()
    return torch.stack(
        [
            boundary_band(labels[b], context.spacing[b], context.boundary_mm, foreground=fg[b])
            for b in range(labels.shape[0])
        ]
    )


def boundary_band(
    labels: torch.Tensor,
    spacing: Sequence[float],
    width_mm: float = 2.0,
    foreground: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean ``(*spatial)`` band of voxels within ``width_mm`` of a foreground edge voxel.

    Args:
        labels: integer label map ``(*spatial)`` of one case (2D or 3D).
        spacing: mm per voxel, one value per axis.
        width_mm: the band's half-width in mm (distance to the nearest edge voxel, inclusive).
        foreground: boolean ``(*spatial)``; defaults to ``labels != 0``.
    """
    fg = labels != 0 if foreground is None else foreground
    edges = label_edges(labels, fg)
    reach = [int(width_mm // s) + 1 for s in spacing]
    box = bounding_box(edges, margin=reach)
    band = torch.zeros_like(edges)
    if box is not None:
        band[box] = dilate_ellipsoid(edges[box], spacing, width_mm)
    return band
