"""Which slices of a volume to show and how: planes from the affine, display orientation, pixel grid.

A volume is stored in any voxel order (RAS, LPS, permuted, oblique); the planes a reader expects
(sagittal, coronal, axial) are found from the affine with :func:`nibabel.orientations.io_orientation`
(for an oblique affine: the closest world axis, as :func:`nibabel.aff2axcodes` does). Each slice is
then turned into a fixed display orientation so that every case looks the same:

- axial: viewed from the feet, anterior up; coronal: viewed from the front, superior up. In the
  radiological convention the patient's right is on the viewer's left, in the neurological one on
  the viewer's right.
- sagittal: viewed from the patient's left, anterior on the viewer's left, superior up.

The letters at the four edges of a panel are derived from the same mapping, so they are right
whatever the storage order; the pixel aspect follows the voxel spacing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from nibabel.orientations import io_orientation
from scipy import ndimage

from segcalib.errors import DataError

PLANES = ("sagittal", "coronal", "axial")
CONVENTIONS = ("radiological", "neurological")
# World axis (0 = x R/L, 1 = y A/P, 2 = z S/I) -> letters of its (negative, positive) direction.
_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))
# plane -> (normal world axis, horizontal world axis, vertical world axis, world sign of "down").
_PLANE_AXES = {"sagittal": (0, 1, 2, -1), "coronal": (1, 0, 2, -1), "axial": (2, 0, 1, -1)}


@dataclass(frozen=True)
class PlaneView:
    """How one plane of a volume is shown.

    ``normal_axis`` is the voxel axis across the plane and ``index`` the slice shown on it;
    displayed rows run along voxel axis ``row_axis`` and columns along ``col_axis``, each reversed
    when the matching ``*_flip`` is true. ``edges`` holds the orientation letters at the (left,
    right, top, bottom) edges; ``row_mm`` and ``col_mm`` are the voxel spacings down and across.
    """

    plane: str
    normal_axis: int
    index: int
    row_axis: int
    col_axis: int
    row_flip: bool
    col_flip: bool
    edges: tuple[str, str, str, str]
    row_mm: float
    col_mm: float

    def extract(self, volume: np.ndarray) -> np.ndarray:
        """The displayed 2D slice ``(rows, cols)`` of a volume ``(*spatial)`` in file voxel order."""
        plane = np.take(volume, self.index, axis=self.normal_axis)
        # After np.take the remaining two axes keep their relative order.
        rest = [a for a in range(3) if a != self.normal_axis]
        if rest.index(self.row_axis) == 1:
            plane = plane.T
        if self.row_flip:
            plane = plane[::-1, :]
        if self.col_flip:
            plane = plane[:, ::-1]
        return plane


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the three voxel axes (lengths of the affine's columns)."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))


def busiest_slices(mask: np.ndarray) -> tuple[int, int, int]:
    """For each voxel axis, the index of the slice holding the most voxels of ``mask``.

    An empty mask gives the middle slice of each axis.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return tuple(n // 2 for n in mask.shape)
    counts = [mask.sum(axis=tuple(a for a in range(3) if a != axis)) for axis in range(3)]
    return tuple(int(np.argmax(c)) for c in counts)


def plane_views(
    affine: np.ndarray, shape: tuple[int, ...], indices: tuple[int, int, int], convention: str = "radiological"
) -> dict[str, PlaneView]:
    """The sagittal, coronal and axial views of a volume of spatial ``shape``.

    Args:
        affine: 4x4 voxel-to-world matrix, RAS+ millimetres as nibabel gives it.
        shape: spatial shape ``(X, Y, Z)`` in file voxel order.
        indices: the slice to show along each *voxel* axis (see :func:`busiest_slices`).
        convention: ``"radiological"`` (patient's right on the viewer's left) or ``"neurological"``.
    """
    if convention not in CONVENTIONS:
        raise DataError(f"orientation convention {convention!r}: expected one of {CONVENTIONS}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"affine {affine.tolist()} is not an invertible 4x4 voxel-to-world matrix")
    if len(shape) < 3:
        raise DataError(f"volume of shape {tuple(shape)}: slices need three spatial axes")
    ornt = io_orientation(affine)
    voxel_of_world = {int(w): v for v, (w, _) in enumerate(ornt)}
    sign_of_voxel = [int(s) for _, s in ornt]
    spacing = voxel_spacing(affine)
    views = {}
    for plane in PLANES:
        normal_w, across_w, down_w, down_sign = _PLANE_AXES[plane]
        # Moving right goes towards the patient's left (radiological axial/coronal) or right
        # (neurological); on a sagittal slice towards posterior in both.
        right_sign = -1 if plane == "sagittal" or convention == "radiological" else 1
        row_axis, col_axis = voxel_of_world[down_w], voxel_of_world[across_w]
        normal = voxel_of_world[normal_w]
        edges = (
            _LETTERS[across_w][(1 - right_sign) // 2],
            _LETTERS[across_w][(1 + right_sign) // 2],
            _LETTERS[down_w][(1 - down_sign) // 2],
            _LETTERS[down_w][(1 + down_sign) // 2],
        )
        views[plane] = PlaneView(
            plane=plane,
            normal_axis=normal,
            index=int(indices[normal]),
            row_axis=row_axis,
            col_axis=col_axis,
            row_flip=sign_of_voxel[row_axis] != down_sign,
            col_flip=sign_of_voxel[col_axis] != right_sign,
            edges=edges,
            row_mm=spacing[row_axis],
            col_mm=spacing[col_axis],
        )
    return views


def slice_extent_mm(view: PlaneView, shape: tuple[int, ...]) -> tuple[float, float]:
    """Height and width in mm of the displayed slice of a volume of spatial ``shape``."""
    return shape[view.row_axis] * view.row_mm, shape[view.col_axis] * view.col_mm


def display_size(view: PlaneView, shape: tuple[int, ...], px_per_mm: float) -> tuple[int, int]:
    """Displayed slice size ``(rows, cols)`` in pixels at ``px_per_mm`` (square pixels in mm)."""
    height, width = slice_extent_mm(view, shape)
    return max(1, int(round(height * px_per_mm))), max(1, int(round(width * px_per_mm)))


def resample(plane: np.ndarray, size: tuple[int, int], order: int) -> np.ndarray:
    """Resample a 2D slice onto a ``size`` pixel grid covering the same field of view.

    Pixel centres map to voxel coordinates ``(i + 0.5) * n / size - 0.5``; ``order`` 0 is nearest
    neighbour (labels), 1 bilinear (intensities, probabilities).
    """
    rows = (np.arange(size[0]) + 0.5) * plane.shape[0] / size[0] - 0.5
    cols = (np.arange(size[1]) + 0.5) * plane.shape[1] / size[1] - 0.5
    if order == 0:
        r = np.clip(np.floor(rows + 0.5).astype(np.int64), 0, plane.shape[0] - 1)
        c = np.clip(np.floor(cols + 0.5).astype(np.int64), 0, plane.shape[1] - 1)
        return plane[np.ix_(r, c)]
    grid = np.meshgrid(rows, cols, indexing="ij")
    return ndimage.map_coordinates(np.asarray(plane, dtype=np.float32), grid, order=order, mode="nearest")


def scale_bar_mm(width_mm: float) -> float:
    """A round scale-bar length (1, 2 or 5 times a power of ten) near a quarter of ``width_mm``."""
    target = max(width_mm / 4.0, 1e-6)
    power = 10.0 ** math.floor(math.log10(target))
    return max(m * power for m in (1, 2, 5) if m * power <= target)
