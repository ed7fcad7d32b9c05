"""Surface distances between two binary masks: Hausdorff distance, HD95 and ASSD in mm (SPEC §4).

Edge voxels are ``mask XOR binary_erosion(mask)`` with the cross element (voxels outside the image
count as background); each edge voxel of one mask gets its Euclidean distance (mm, with spacing)
to the nearest edge voxel of the other.

- ``hd``: max of the two directed maxima.
- ``hd95``: max of the two directed 95th percentiles (linear interpolation), as MONAI's
  ``compute_hausdorff_distance(percentile=95)``; with ``pooled=True``, the percentile of the
  pooled distances (the medpy / DeepMind ``surface-distance`` convention).
- ``assd``: mean of the pooled directed distances, as MONAI's
  ``compute_average_surface_distance(symmetric=True)``.
- Both masks empty: NaN for all; exactly one empty: inf (MONAI's convention).

Reference: Huttenlocher et al., "Comparing images using the Hausdorff distance", TPAMI 1993.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from segcalib.metrics.inputs import INCLUDE_BACKGROUND, prediction_labels
from segcalib.spatial.distance import nearest_between
from segcalib.spatial.morphology import bounding_box, mask_edges
from segcalib.spatial.spacing import BatchSpacingLike, SpacingLike, normalize_spacing, spacing_per_case

SURFACE_KEYS = ("hd", "hd95", "assd")


def linear_percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile (0..100) with linear interpolation, as ``np.percentile`` /
    ``torch.quantile`` by default, but without ``torch.quantile``'s input size limit.

    Args:
        values: 1-D float tensor, not empty.
        q: percentile in [0, 100].
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    n = values.numel()
    pos = (q / 100.0) * (n - 1)
    lo = int(math.floor(pos))
    frac = pos - lo
    a = torch.kthvalue(values, lo + 1).values
    if frac == 0.0 or lo + 1 >= n:
        return a
    b = torch.kthvalue(values, lo + 2).values
    return torch.lerp(a, b, torch.tensor(frac, dtype=values.dtype, device=values.device))


def cropped_pair(
    pred_mask: torch.Tensor | np.ndarray, gt_mask: torch.Tensor | np.ndarray, spacing: SpacingLike = None
) -> tuple[torch.Tensor, torch.Tensor, tuple[float, ...]] | None:
    """Two binary masks ``(*spatial)`` (2D or 3D, same shape) cropped to their joint bounding box
    plus one voxel, on ``pred_mask``'s device, with the spacing as a tuple (mm); ``None`` when both
    are empty. The common start of every surface measure (the crop leaves the edges unchanged)."""
    pred, gt = torch.as_tensor(pred_mask).bool(), torch.as_tensor(gt_mask).bool()
    if pred.shape != gt.shape:
        raise ValueError(f"pred_mask {tuple(pred.shape)} and gt_mask {tuple(gt.shape)} differ in shape")
    if pred.dim() not in (2, 3):
        raise ValueError(f"expected a 2D or 3D mask, got shape {tuple(pred.shape)}")
    gt = gt.to(pred.device)
    sp = normalize_spacing(spacing, pred.dim())
    box = bounding_box(pred | gt, margin=1)
    if box is None:
        return None
    return pred[box], gt[box], sp


def surface_distances(
    pred_mask: torch.Tensor | np.ndarray,
    gt_mask: torch.Tensor | np.ndarray,
    spacing: SpacingLike = None,
    percentile: float = 95.0,
    pooled: bool = False,
) -> dict[str, float]:
    """Hausdorff distance, percentile Hausdorff distance and average symmetric surface distance.

    Args:
        pred_mask: boolean ``(*spatial)`` (2D or 3D), on any device.
        gt_mask: boolean ``(*spatial)``, same shape and device.
        spacing: mm per voxel, one value per axis in the tensor's axis order (``None`` = 1 mm).
        percentile: the percentile of ``hd95`` (95 by default).
        pooled: take the percentile of the pooled distances of both directions (medpy) instead
            of the max of the two directed percentiles (MONAI, the default).

    Returns:
        ``{"hd", "hd95", "assd"}`` as Python floats in mm.
    """
    pair = cropped_pair(pred_mask, gt_mask, spacing)
    if pair is None:
        return dict.fromkeys(SURFACE_KEYS, float("nan"))
    pred, gt, sp = pair
    has = torch.stack([pred.any(), gt.any()]).tolist()
    if not all(has):
        return dict.fromkeys(SURFACE_KEYS, float("inf"))
    edges_pred, edges_gt = mask_edges(pred), mask_edges(gt)
    d_pred_gt, d_gt_pred = nearest_between(edges_pred, edges_gt, sp)
    both = torch.cat([d_pred_gt, d_gt_pred])
    hd = both.max()
    if pooled:
        hdq = linear_percentile(both, percentile)
    else:
        hdq = torch.maximum(linear_percentile(d_pred_gt, percentile), linear_percentile(d_gt_pred, percentile))
    values = torch.stack([hd, hdq, both.mean()]).tolist()
    return dict(zip(SURFACE_KEYS, values))


def surface_distances_per_class(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    spacing: SpacingLike = None,
    include_background: bool = INCLUDE_BACKGROUND,
    percentile: float = 95.0,
    pooled: bool = False,
) -> list[dict[str, float]]:
    """:func:`surface_distances` for each class of two label maps ``(*spatial)`` of one case.

    Returns one dict per class (classes ``0..C-1``, or ``1..C-1`` when ``include_background`` is
    False, in that order).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    first = 0 if include_background else 1
    return [
        surface_distances(pred == k, target == k, spacing, percentile=percentile, pooled=pooled)
        for k in range(first, num_classes)
    ]


def compute_surface_distances(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    spacing: BatchSpacingLike = None,
    include_background: bool = INCLUDE_BACKGROUND,
    percentile: float = 95.0,
    pooled: bool = False,
) -> dict[str, torch.Tensor]:
    """HD, HD95 and ASSD per case and class of a batch, MONAI style (the batch functional twin of
    :class:`~segcalib.metrics.segmentation_metric.SegmentationMetric`).

    Args:
        pred: ``(B, C, *spatial)`` probabilities / one-hot, or labels ``(B, *spatial)`` /
            ``(B, 1, *spatial)``.
        target: integer labels ``(B, *spatial)`` or ``(B, 1, *spatial)``.
        num_classes: ``C``.
        spacing: mm per voxel, shared by the batch or one per case (``None`` = 1 mm: voxel units).
        include_background: evaluate class 0 too.
        percentile, pooled: as :func:`surface_distances`.

    Returns:
        float64 ``{"hd", "hd95", "assd"}``, each ``(B, C')`` in mm.
    """
    labels, truth = prediction_labels(pred, target, num_classes)
    spacings = spacing_per_case(spacing, labels.shape[0], labels.dim() - 1)
    rows = [
        surface_distances_per_class(labels[b], truth[b], num_classes, spacings[b], include_background, percentile, pooled)
        for b in range(labels.shape[0])
    ]
    return {
        key: torch.tensor([[d[key] for d in row] for row in rows], dtype=torch.float64).view(len(rows), -1)
        for key in SURFACE_KEYS
    }
