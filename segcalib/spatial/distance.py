"""Euclidean distances with voxel spacing; the tensor's device picks the implementation.

- :func:`distance_transform` -- the exact Euclidean distance transform (EDT) of a mask: scipy on
  CPU; on CUDA, CuPy's ``cupyx.scipy.ndimage.distance_transform_edt`` through DLPack when CuPy is
  importable (``pip install segcalib[gpu]``), else an exact separable torch implementation.
- :func:`nearest_distances` -- for each True voxel of one mask, the distance to the nearest True
  voxel of another (surface distances): a KD-tree over the target's voxels on CPU (its cost grows
  with the surface, not the volume, so it beats a dense EDT there), the EDT on CUDA
  (:func:`nearest_method`). The surface measures call it on masks already cropped to the joint
  bounding box of both masks plus one voxel (``segcalib.metrics.surface.cropped_pair``), which is
  the bounding box of both surfaces plus one voxel: every surface voxel of either mask lies in the
  crop, so the EDT over the crop is exact, and its cost follows the structures, not the image.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from segcalib.spatial.spacing import SpacingLike, normalize_spacing


@lru_cache(maxsize=1)
def _cupy() -> tuple[Any, Any] | None:
    """``(cupy, cupyx.scipy.ndimage)`` when CuPy with a working CUDA runtime is importable."""
    try:
        cupy = importlib.import_module("cupy")
        ndi = importlib.import_module("cupyx.scipy.ndimage")
        cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - any import/runtime failure means "not available"
        return None
    return cupy, ndi


def distance_transform(mask: torch.Tensor, spacing: SpacingLike = None) -> torch.Tensor:
    """Exact Euclidean distance transform in mm, on the mask's device.

    Same semantics as ``scipy.ndimage.distance_transform_edt(mask, sampling=spacing)``: each True
    voxel gets its distance (centre to centre) to the nearest False voxel; False voxels get 0.
    When the mask has no False voxel every value is ``inf``.

    Args:
        mask: boolean ``(*spatial)`` (2D or 3D).
        spacing: mm per voxel, one value per axis (``None`` = 1 mm).

    Returns:
        float64 tensor ``(*spatial)`` on ``mask.device``.
    """
    mask = mask.bool()
    return edt(mask, normalize_spacing(spacing, mask.dim()))


def edt(mask: torch.Tensor, sp: tuple[float, ...]) -> torch.Tensor:
    """:func:`distance_transform` of a boolean mask with an already validated spacing tuple."""
    if bool(mask.all()):
        return torch.full(mask.shape, float("inf"), dtype=torch.float64, device=mask.device)
    if mask.device.type == "cpu":
        from scipy import ndimage

        out = ndimage.distance_transform_edt(mask.numpy(), sampling=sp)
        return torch.from_numpy(np.asarray(out, dtype=np.float64))
    if mask.device.type == "cuda" and _cupy() is not None:
        return _edt_cupy(mask, sp)
    return edt_torch(mask, sp)


def _edt_cupy(mask: torch.Tensor, spacing: tuple[float, ...]) -> torch.Tensor:
    cupy, ndi = _cupy()  # type: ignore[misc]
    with cupy.cuda.Device(mask.device.index), cupy.cuda.ExternalStream(torch.cuda.current_stream(mask.device).cuda_stream):
        image = cupy.from_dlpack(mask.contiguous().to(torch.uint8))
        out = ndi.distance_transform_edt(image, sampling=spacing)  # float64 distances
        return torch.from_dlpack(out)


def _nearest_on_lines(features: torch.Tensor, axis: int) -> torch.Tensor:
    """Index distance along ``axis`` to the nearest True voxel on the same line (inf when none)."""
    n = features.shape[axis]
    shape = [1] * features.dim()
    shape[axis] = n
    pos = torch.arange(n, dtype=torch.float64, device=features.device).view(shape)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=features.device)
    left = torch.where(features, pos, -inf).cummax(dim=axis).values
    right = torch.where(features, pos, inf).flip(axis).cummin(dim=axis).values.flip(axis)
    return torch.minimum(pos - left, right - pos)


def _envelope_pass(f: torch.Tensor, axis: int, step: float) -> torch.Tensor:
    """``g[i] = min_j f[j] + ((i - j) * step)^2`` along ``axis``, exactly (shifts with early stop)."""
    n = f.shape[axis]
    g = f.clone()
    on_finite_line = torch.isfinite(f).any(dim=axis, keepdim=True).expand_as(f)
    check_every = 4
    for k in range(1, n):
        if (k - 1) % check_every == 0:
            # stop once no shift >= k can lower any value that still matters
            bound = torch.where(on_finite_line, g, torch.zeros((), dtype=g.dtype, device=g.device)).max()
            d = (k * step) * (k * step)
            if d >= float(bound):
                break
        d = (k * step) * (k * step)
        hi = g.narrow(axis, k, n - k)
        torch.minimum(hi, f.narrow(axis, 0, n - k) + d, out=hi)
        lo = g.narrow(axis, 0, n - k)
        torch.minimum(lo, f.narrow(axis, k, n - k) + d, out=lo)
    return g


def edt_torch(mask: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Exact separable EDT in torch (the CUDA fallback; also runs on CPU for testing).

    Pass 1 finds the nearest False voxel along the first axis with cumulative max/min; the other
    axes take the lower envelope ``min_j f[j] + (s (i-j))^2`` by shifted minima, stopping once the
    shift cost exceeds every finite value. Squared distances are summed in axis order as scipy does.

    Args:
        mask: boolean ``(*spatial)``; distances are computed for its True voxels.
        spacing: mm per voxel, one value per axis.
    """
    features = ~mask.bool()
    if not bool(features.any()):
        return torch.full(mask.shape, float("inf"), dtype=torch.float64, device=mask.device)
    d = _nearest_on_lines(features, 0) * spacing[0]
    f = d * d
    for axis in range(1, mask.dim()):
        f = _envelope_pass(f, axis, float(spacing[axis]))
    return f.sqrt_()


def nearest_distances(points: torch.Tensor, targets: torch.Tensor, spacing: SpacingLike = None) -> torch.Tensor:
    """Distance in mm from each True voxel of ``points`` to the nearest True voxel of ``targets``.

    Args:
        points: boolean ``(*spatial)``.
        targets: boolean ``(*spatial)``, same shape and device; must have a True voxel unless
            ``points`` is empty.
        spacing: mm per voxel, one value per axis.

    Returns:
        float64 ``(n_points,)`` on the masks' device, in C order of the True voxels of ``points``.
    """
    return symmetric_nearest_distances(points, targets, spacing, both=False)[0]


def symmetric_nearest_distances(
    a: torch.Tensor, b: torch.Tensor, spacing: SpacingLike = None, both: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`nearest_distances` from ``a`` to ``b`` and (with ``both``) from ``b`` to ``a``,
    sharing the voxel coordinates of the two masks."""
    a, b = a.bool(), b.bool()
    if a.shape != b.shape:
        raise ValueError(f"masks of shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    return nearest_between(a, b, normalize_spacing(spacing, a.dim()), both)


def nearest_method(device: torch.device) -> str:
    """How :func:`nearest_between` finds nearest voxels on ``device``: ``"kdtree"`` on CPU, ``"edt"``
    (a dense EDT of the target's complement, read at the query voxels) elsewhere."""
    return "kdtree" if device.type == "cpu" else "edt"


def nearest_between(
    a: torch.Tensor, b: torch.Tensor, sp: tuple[float, ...], both: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`symmetric_nearest_distances` of two boolean masks of one shape, with an already
    validated spacing tuple, by :func:`nearest_method` (the ``"edt"`` path runs on any device)."""
    if nearest_method(a.device) == "edt":
        d_ab = edt(~b, sp)[a]
        return d_ab, (edt(~a, sp)[b] if both else None)
    a_np, b_np = a.numpy(), b.numpy()
    a_idx, b_idx = np.flatnonzero(a_np), np.flatnonzero(b_np)
    scale = np.asarray(sp, dtype=np.float64)

    def coords(flat: np.ndarray) -> np.ndarray:
        return np.stack(np.unravel_index(flat, a_np.shape), axis=-1) * scale

    a_xyz, b_xyz = coords(a_idx), coords(b_idx)
    d_ab = _nearest_kdtree(a_xyz, b_np.reshape(-1)[a_idx], b_xyz)
    d_ba = _nearest_kdtree(b_xyz, a_np.reshape(-1)[b_idx], a_xyz) if both else None
    return torch.from_numpy(d_ab), (None if d_ba is None else torch.from_numpy(d_ba))


def _nearest_kdtree(query: np.ndarray, on_target: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Distances from ``query`` points (mm) to the nearest ``targets`` point; points flagged
    ``on_target`` are target voxels themselves (distance 0) and skip the tree."""
    from scipy.spatial import cKDTree

    out = np.zeros(len(query), dtype=np.float64)
    away = ~on_target
    if away.any():
        tree = cKDTree(targets, leafsize=32, balanced_tree=False, compact_nodes=False)
        out[away] = tree.query(query[away], k=1, workers=max(1, torch.get_num_threads()))[0]
    return out
