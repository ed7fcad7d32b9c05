"""Calibration and segmentation metrics: streaming, mergeable across processes, on the input's device.

- Calibration (SPEC §3): :class:`CalibrationMetric` (ECE, MCE, class-wise ECE, NLL, Brier and
  reliability bins per region ``all`` / ``foreground`` / ``boundary``), and the functional
  :func:`expected_calibration_error`, :func:`classwise_calibration_error`.
- Segmentation (SPEC §4): :func:`dice` per class, :func:`surface_distances` (HD, HD95, ASSD in mm).
- Every metric by name (:mod:`segcalib.metrics.registry`): :func:`list_metrics`,
  :func:`metric_value`, :func:`streaming_metric`, :func:`metric_spec`; binning schemes
  :func:`list_binnings`. One ``include_background`` default, :data:`INCLUDE_BACKGROUND` (True).
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
from segcalib.metrics.adaptive import AdaptiveCalibrationError, adaptive_calibration_error
from segcalib.metrics.inputs import INCLUDE_BACKGROUND
from segcalib.metrics.kernel_calibration import kernel_calibration_error
from segcalib.metrics.monai_calibration import MonaiCalibrationError, monai_calibration_error
from segcalib.metrics.nsd import compute_surface_dice, normalized_surface_dice
from segcalib.metrics.overlap import dice, dice_counts, dice_from_counts
from segcalib.metrics.registry import (
    BINNINGS,
    MetricSpec,
    list_binnings,
    list_metrics,
    metric_spec,
    metric_value,
    register_metric,
    streaming_metric,
)
from segcalib.metrics.scores import ScoreMetric, brier_score, log_score, proper_scores, root_brier_score
from segcalib.metrics.segmentation_metric import SegmentationMetric
from segcalib.metrics.smooth_ece import SmoothECE, smooth_ece
from segcalib.metrics.uncertainty import UncertaintyMetric, uncertainty_dice_correlation
from segcalib.spatial.distance import distance_transform, nearest_distances
from segcalib.spatial.morphology import mask_edges
from segcalib.spatial.regions import RegionContext, available_regions, boundary_band, register_region
from segcalib.metrics.surface import compute_surface_distances, surface_distances, surface_distances_per_class

__all__ = [
    "AdaptiveCalibrationError",
    "BINNINGS",
    "CalibrationMetric",
    "CalibrationResult",
    "CaseCalibration",
    "DEFAULT_REGIONS",
    "INCLUDE_BACKGROUND",
    "MetricSpec",
    "MonaiCalibrationError",
    "RegionCalibration",
    "RegionContext",
    "ScoreMetric",
    "SegmentationMetric",
    "SmoothECE",
    "UncertaintyMetric",
    "adaptive_calibration_error",
    "available_regions",
    "bin_index",
    "boundary_band",
    "brier_score",
    "classwise_calibration_error",
    "compute_surface_dice",
    "compute_surface_distances",
    "dice",
    "dice_counts",
    "dice_from_counts",
    "distance_transform",
    "expected_calibration_error",
    "kernel_calibration_error",
    "list_binnings",
    "list_metrics",
    "log_score",
    "mask_edges",
    "metric_spec",
    "metric_value",
    "monai_calibration_error",
    "nearest_distances",
    "normalized_surface_dice",
    "proper_scores",
    "register_metric",
    "register_region",
    "root_brier_score",
    "smooth_ece",
    "streaming_metric",
    "surface_distances",
    "surface_distances_per_class",
    "uncertainty_dice_correlation",
]
