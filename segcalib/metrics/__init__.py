"""Calibration and segmentation metrics: streaming, mergeable across processes, on the input's device.

- Calibration (SPEC §3): :class:`CalibrationMetric` (ECE, MCE, class-wise ECE, NLL, Brier and
  reliability bins per region ``all`` / ``foreground`` / ``boundary``), and the functional
  :func:`expected_calibration_error`, :func:`classwise_calibration_error`.
- Segmentation (SPEC §4): :func:`dice` per class, :func:`surface_distances` (HD, HD95, ASSD in mm).
- Building blocks (from :mod:`segcalib.spatial`): :func:`distance_transform` (exact EDT; scipy on CPU, CuPy or torch on CUDA),
  :func:`boundary_band`, the region registry :func:`register_region`.
"""

from segcalib.metrics.binning import bin_index
from segcalib.metrics.calibration import (
    DEFAULT_REGIONS,
    CalibrationMetric,
    CalibrationResult,
    CaseCalibration,
    RegionCalibration,
)
from segcalib.metrics.calibration_functional import classwise_calibration_error, expected_calibration_error
from segcalib.metrics.overlap import dice, dice_counts, dice_from_counts
from segcalib.spatial.distance import distance_transform, nearest_distances
from segcalib.spatial.morphology import mask_edges
from segcalib.spatial.regions import RegionContext, available_regions, boundary_band, register_region
from segcalib.metrics.surface import surface_distances, surface_distances_per_class

__all__ = [
    "DEFAULT_REGIONS",
    "CalibrationMetric",
    "CalibrationResult",
    "CaseCalibration",
    "RegionCalibration",
    "RegionContext",
    "available_regions",
    "bin_index",
    "boundary_band",
    "classwise_calibration_error",
    "dice",
    "dice_counts",
    "dice_from_counts",
    "distance_transform",
    "expected_calibration_error",
    "mask_edges",
    "nearest_distances",
    "register_region",
    "surface_distances",
    "surface_distances_per_class",
]
