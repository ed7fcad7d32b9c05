"""Geometry on voxel grids, below every layer that needs it (metrics, calibrators, export).

- :mod:`~segcalib.spatial.spacing`: voxel spacing in mm, one value per spatial axis.
- :mod:`~segcalib.spatial.morphology`: edges with the cross element, ellipsoidal dilation.
- :mod:`~segcalib.spatial.distance`: exact Euclidean distance transforms (scipy, CuPy or torch).
- :mod:`~segcalib.spatial.regions`: the registry of ground-truth regions (``all``, ``foreground``,
  ``boundary``) on which calibration is fitted and measured.
"""

from segcalib.spatial.distance import distance_transform, nearest_distances
from segcalib.spatial.morphology import mask_edges
from segcalib.spatial.regions import (
    RegionContext,
    available_regions,
    boundary_band,
    region_mask,
    register_region,
)
from segcalib.spatial.spacing import normalize_spacing

__all__ = [
    "RegionContext",
    "available_regions",
    "boundary_band",
    "distance_transform",
    "mask_edges",
    "nearest_distances",
    "normalize_spacing",
    "region_mask",
    "register_region",
]
