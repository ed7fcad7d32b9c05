"""Binary morphology on torch tensors (any device): edges with the cross element, ellipsoidal dilation.

Conventions (SPEC §3-4): the structuring element for erosion is the cross (6-connected in 3D,
4-connected in 2D, ``scipy.ndimage.generate_binary_structure(ndim, 1)``), and voxels outside the
image count as background (scipy's default ``border_value=0``), so foreground voxels on the image
border are edge voxels. MONAI's ``get_mask_edges`` behaves the same way: it crops to the union
bounding box with a 1-voxel margin (zero padding where the box leaves the image) and then calls
scipy's ``binary_erosion`` with its default border.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch


def _axis_slices(ndim: int, axis: int, sl: slice) -> tuple[slice, ...]:
    index = [slice(None)] * ndim
    index[axis] = sl
    return tuple(index)


def binary_erosion(mask: torch.Tensor) -> torch.Tensor:
    """Erode a boolean mask ``(*spatial)`` with the cross element; outside the image is background."""
    mask = mask.bool()
    eroded = mask.clone()
    for axis in range(mask.dim()):
        n = mask.shape[axis]
        if n == 1:
            return torch.zeros_like(mask)
        lo, hi = _axis_slices(mask.dim(), axis, slice(1, None)), _axis_slices(mask.dim(), axis, slice(None, -1))
        eroded[lo].bitwise_and_(mask[hi])  # in place on the view (``x[i] &= y`` would copy it back)
        eroded[hi].bitwise_and_(mask[lo])
        eroded[_axis_slices(mask.dim(), axis, slice(0, 1))] = False
        eroded[_axis_slices(mask.dim(), axis, slice(n - 1, n))] = False
    return eroded


def mask_edges(mask: torch.Tensor) -> torch.Tensor:
    """Edge voxels ``mask XOR binary_erosion(mask)`` of a boolean mask ``(*spatial)`` (SPEC §4)."""
    mask = mask.bool()
    return mask & ~binary_erosion(mask)


def label_edges(labels: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """Union over foreground classes k of the edge voxels of ``labels == k``.

    A voxel is an edge voxel of its own class when it lies on the image border or one of its
    cross neighbours carries another label; only voxels in ``foreground`` are kept. This equals
    ``OR_k mask_edges(labels == k)`` over the classes present in ``foreground`` in one pass,
    without a loop over classes.

    Args:
        labels: integer label map ``(*spatial)``.
        foreground: boolean ``(*spatial)``, the voxels whose class counts as foreground.
    """
    ndim = labels.dim()
    differs = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    for axis in range(ndim):
        n = labels.shape[axis]
        differs[_axis_slices(ndim, axis, slice(0, 1))] = True
        differs[_axis_slices(ndim, axis, slice(n - 1, n))] = True
        if n > 1:
            lo, hi = _axis_slices(ndim, axis, slice(1, None)), _axis_slices(ndim, axis, slice(None, -1))
            step = labels[lo] != labels[hi]
            differs[lo].bitwise_or_(step)  # in place on the view (``x[i] |= y`` would copy it back)
            differs[hi].bitwise_or_(step)
    return differs & foreground


@lru_cache(maxsize=64)
def ellipsoid_rows(spacing: tuple[float, ...], radius: float) -> tuple[tuple[tuple[int, ...], int], ...]:
    """The ellipsoid ``{o in Z^d : sqrt(sum_i (o_i * s_i)^2) <= radius}`` as rows along the last axis.

    Returns ``((prefix, h), ...)``: for each offset ``prefix`` over the first ``d-1`` axes, the
    last-axis offsets form the full range ``[-h, h]``. The distance is evaluated in float64 with
    the same arithmetic as ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``.
    """
    if radius < 0:
        return ()
    reach = [int(radius // s) + 1 for s in spacing]

    def inside(offset: Sequence[int]) -> bool:
        total = 0.0
        for o, s in zip(offset, spacing):
            d = o * s
            total += d * d
        return math.sqrt(total) <= radius

    rows = []
    prefixes = [()]
    for r in reach[:-1]:
        prefixes = [p + (o,) for p in prefixes for o in range(-r, r + 1)]
    for prefix in prefixes:
        if not inside(prefix + (0,)):
            continue
        h = 0
        while h + 1 <= reach[-1] and inside(prefix + (h + 1,)):
            h += 1
        rows.append((prefix, h))
    return tuple(rows)


def _shift_or(out: torch.Tensor, src: torch.Tensor, offset: Sequence[int]) -> None:
    """``out |= src`` shifted by ``offset`` voxels (zero fill), in place."""
    dst_index, src_index = [], []
    for o, n in zip(offset, src.shape):
        if abs(o) >= n:
            return
        dst_index.append(slice(max(o, 0), n + min(o, 0)))
        src_index.append(slice(max(-o, 0), n - max(o, 0)))
    lead = len(offset)
    dst = tuple(dst_index) + (slice(None),) * (src.dim() - lead)
    srcs = tuple(src_index) + (slice(None),) * (src.dim() - lead)
    out[dst].bitwise_or_(src[srcs])  # in place on the view (``out[dst] |= ...`` would copy it back)


def dilate_ellipsoid(mask: torch.Tensor, spacing: Sequence[float], radius: float) -> torch.Tensor:
    """Dilate a boolean mask ``(*spatial)`` by the ellipsoid of ``radius`` mm (voxel spacing in mm).

    The result is exactly ``{v : distance(v, nearest True voxel of mask) <= radius}`` (centre to
    centre, Euclidean, in mm), i.e. ``distance_transform_edt(~mask, sampling=spacing) <= radius``,
    computed with shifted ORs: 1-D dilations along the last axis, then one OR per row of the
    ellipsoid. Works on any device.

    Args:
        mask: boolean ``(*spatial)``.
        spacing: mm per voxel, one value per axis.
        radius: mm.
    """
    mask = mask.bool()
    rows = ellipsoid_rows(tuple(float(s) for s in spacing), float(radius))
    if not rows:
        return torch.zeros_like(mask)
    h_max = max(h for _, h in rows)
    runs = [mask]
    for h in range(1, h_max + 1):
        nxt = runs[-1].clone()
        _shift_or(nxt, mask, (0,) * (mask.dim() - 1) + (h,))
        _shift_or(nxt, mask, (0,) * (mask.dim() - 1) + (-h,))
        runs.append(nxt)
    out = torch.zeros_like(mask)
    for prefix, h in rows:
        _shift_or(out, runs[h], prefix + (0,))
    return out


def bounding_box(mask: torch.Tensor, margin: Sequence[int] | int = 0) -> tuple[slice, ...] | None:
    """Slices of the bounding box of the True voxels of ``mask``, grown by ``margin`` voxels per axis
    and clipped to the image; ``None`` when the mask is empty (one host sync)."""
    ndim = mask.dim()
    margins = [margin] * ndim if isinstance(margin, int) else list(margin)
    if mask.numel() == 0:
        return None
    # two passes over the volume, each a max over the bytes of the mask (vectorised, unlike any()
    # over bools) along long contiguous runs: per slice of the first axis, and across those slices;
    # the other axes from the small remainder
    mask = mask.bool().view(torch.uint8)
    if ndim == 1:
        flags = [mask]
    else:
        rest = mask.amax(dim=0)  # elementwise max of the first axis's slices
        flags = [mask.reshape(mask.shape[0], -1).amax(dim=1)]
        for axis in range(ndim - 1):
            other = [a for a in range(ndim - 1) if a != axis]
            flags.append(rest.amax(dim=other) if other else rest)
    lengths = [f.numel() for f in flags]
    cat = torch.cat([f.to(torch.uint8) for f in flags]).cpu()
    slices, start = [], 0
    for axis, n in enumerate(lengths):
        nz = torch.nonzero(cat[start : start + n]).flatten()
        start += n
        if nz.numel() == 0:
            return None
        lo = max(int(nz[0]) - margins[axis], 0)
        hi = min(int(nz[-1]) + 1 + margins[axis], n)
        slices.append(slice(lo, hi))
    return tuple(slices)
