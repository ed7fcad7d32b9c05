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

A new region is one function plus ``@register_region("name", description)``; it receives a
:class:`RegionContext` and returns a boolean ``(B, *spatial)`` mask (or ``None`` for every voxel).
This module is the one place that names regions: the CLI choices, the exporter, the calibrators,
the metrics and the reports all read :func:`available_regions`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from segcalib.spatial.morphology import bounding_box, dilate_ellipsoid, label_edges
from segcalib.utils.names import Registry
from segcalib.utils.tensors import not_equal

ALL = "all"
FOREGROUND = "foreground"  # the seed papers' region; per-volume foreground ECE is the "MedIA" convention
BOUNDARY = "boundary"
DEFAULT_BOUNDARY_MM = 2.0
MAX_PARTIAL_REGIONS = 7  # cells are bit sets in uint8, one value kept for ignored voxels


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
    boundary_mm: float = DEFAULT_BOUNDARY_MM
    ignore_index: int | None = None

    def foreground(self) -> torch.Tensor:
        """Boolean ``(B, *spatial)``: ground truth not background and not ignored."""
        fg = self.target != 0
        if self.ignore_index is not None:
            fg &= self.target != self.ignore_index
        return fg


RegionFn = Callable[[RegionContext], "torch.Tensor | None"]
_REGIONS: Registry[RegionFn] = Registry("region")
_DESCRIPTIONS: dict[str, str] = {}
_SHORT: dict[str, str] = {}



def register_region(name: str, description: str = "", short: str | None = None) -> Callable[[RegionFn], RegionFn]:
    """Decorator adding a region function to the registry under ``name``.

    ``description`` is shown in reports (``{boundary_mm}`` in it is filled with the band's
    width); ``short`` is the name in table headers (default: ``name``).
    """

    def wrap(fn: RegionFn) -> RegionFn:
        _REGIONS.register(name, fn)
        _DESCRIPTIONS[name] = description
        _SHORT[name] = short or name
        return fn

    return wrap


def available_regions() -> list[str]:
    """Names of the registered regions."""
    return list(_REGIONS)


def default_regions() -> tuple[str, ...]:
    """The regions evaluated when none are named: every registered one."""
    return tuple(_REGIONS)


def region_description(name: str, boundary_mm: float = DEFAULT_BOUNDARY_MM) -> str:
    """One line saying which voxels region ``name`` holds (for reports)."""
    check_region(name)
    return _DESCRIPTIONS[name].format(boundary_mm=boundary_mm)


def region_label(name: str) -> str:
    """The region's short name for table headers (``fg`` for ``foreground``)."""
    return _SHORT[check_region(name)]


def check_region(name: str) -> str:
    """``name`` if it is registered, else :class:`~segcalib.utils.names.UnknownNameError` (a
    ConfigError and a ValueError: exit 2) listing the registered ones."""
    return _REGIONS.check(name)


def region_mask(name: str, context: RegionContext) -> torch.Tensor | None:
    """Boolean ``(B, *spatial)`` mask of region ``name`` (``None`` means every voxel)."""
    return _REGIONS[check_region(name)](context)


@register_region(ALL, "every voxel")
def _all(context: RegionContext) -> torch.Tensor | None:
    return None


@register_region(FOREGROUND, "ground truth != background", short="fg")
def _foreground(context: RegionContext) -> torch.Tensor:
    return context.foreground()


@register_region(
    BOUNDARY,
    "voxels within {boundary_mm:g} mm (with spacing) of an edge voxel of any ground-truth foreground "
    "class, both sides",
)
def _boundary(context: RegionContext) -> torch.Tensor:
    labels = context.target
    ignore = context.ignore_index
    if context.num_classes <= 2**8 and (ignore is None or not 0 <= ignore % 2**8 < context.num_classes):
        # label comparisons on uint8 (modular cast: classes and the ignore label stay distinct)
        # read 8x less memory than on int64 and are vectorised, unlike int16's
        labels = labels.to(torch.uint8)
        fg = not_equal(labels, 0)
        if ignore is not None:
            fg &= not_equal(labels, ignore % 2**8)
    else:
        if context.num_classes < 2**15 and (ignore is None or -(2**15) <= ignore < 2**15):
            labels = labels.to(torch.int16)
        fg = context.foreground()
    band = torch.empty(labels.shape, dtype=torch.bool, device=labels.device)
    for b in range(labels.shape[0]):
        boundary_band(labels[b], context.spacing[b], context.boundary_mm, foreground=fg[b], out=band[b])
    return band


def boundary_band(
    labels: torch.Tensor,
    spacing: Sequence[float],
    width_mm: float = DEFAULT_BOUNDARY_MM,
    foreground: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean ``(*spatial)`` band of voxels within ``width_mm`` of a foreground edge voxel.

    Args:
        labels: integer label map ``(*spatial)`` of one case (2D or 3D).
        spacing: mm per voxel, one value per axis.
        width_mm: the band's half-width in mm (distance to the nearest edge voxel, inclusive).
        foreground: boolean ``(*spatial)``; defaults to ``labels != 0``.
        out: boolean ``(*spatial)`` to write the band into (returned), or None for a new tensor.
    """
    fg = not_equal(labels, 0) if foreground is None else foreground
    edges = label_edges(labels, fg)
    reach = [int(width_mm // s) + 1 for s in spacing]
    box = bounding_box(edges, margin=reach)
    if box is not None and all(sl.stop - sl.start == n for sl, n in zip(box, edges.shape)) and out is None:
        return dilate_ellipsoid(edges, spacing, width_mm)  # the box is the whole image
    band = torch.zeros_like(edges) if out is None else out.fill_(False)
    if box is not None:
        band[box] = dilate_ellipsoid(edges[box], spacing, width_mm)
    return band


def region_cells(
    target: torch.Tensor, regions: Sequence[str], context: RegionContext, ignore_index: int | None
) -> tuple[torch.Tensor | None, int, torch.Tensor, torch.Tensor]:
    """Split the voxels into disjoint cells (combinations of region memberships), so that one
    pass over the voxels serves every region.

    Returns ``cells`` (uint8 ``(B, *S)`` or ``None`` when every voxel is in every region), the
    number of cells, the ``(R, n_cells)`` float64 membership matrix (region r = sum of its cells)
    and the target with ignored voxels set to 0 (they go to the dropped cell ``n_cells``).
    """
    masks: list[torch.Tensor] = []
    bit_of: dict[str, int] = {}
    for name in regions:
        mask = region_mask(name, context)
        if mask is not None:
            bit_of[name] = len(masks)
            masks.append(mask)
    if len(masks) > MAX_PARTIAL_REGIONS:
        raise ValueError(f"at most {MAX_PARTIAL_REGIONS} regions that are not every voxel")
    n_cells = 2 ** len(masks)
    cell_ids = torch.arange(n_cells, device=target.device)  # built on the device: no host-to-device copy (a sync)
    membership = torch.stack(
        [
            ((cell_ids >> bit_of[name]) & 1).double() if name in bit_of
            else torch.ones(n_cells, dtype=torch.float64, device=target.device)
            for name in regions
        ]
    )
    ignored = target == ignore_index if ignore_index is not None else None
    if not masks and ignored is None:
        return None, 1, membership, target
    cells = torch.zeros(target.shape, dtype=torch.uint8, device=target.device)
    for bit, mask in enumerate(masks):
        cells |= mask.to(torch.uint8) << bit
    if ignored is not None:
        cells.masked_fill_(ignored, n_cells)
        target = target.masked_fill(ignored, 0)
    return cells, n_cells, membership, target
