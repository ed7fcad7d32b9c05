"""medpy-compatible Dice and surface distances (``medpy.metric.binary``, medpy 0.5.2), on torch masks,
and the empty-class conventions of the seed papers as an option.

medpy's conventions, followed exactly by the ``medpy_*`` functions:

- ``dc``: ``2 |A & B| / (|A| + |B|)``; both masks empty gives **NaN**: medpy's code means 1.0
  (it catches ``ZeroDivisionError``), but with NumPy >= 2 its counts are NumPy integers, the
  division is a NumPy float division and returns NaN -- what medpy 0.5.2 returns today.
- surfaces: ``mask XOR binary_erosion(mask)`` with ``generate_binary_structure(ndim, connectivity)``
  (segcalib's edges are the ``connectivity=1`` case, the only one supported here) and scipy's EDT
  with ``sampling=voxelspacing``; either mask empty raises (medpy raises ``RuntimeError``; here
  ``ValueError``).
- ``hd``: max of both directed maxima; ``hd95``: 95th percentile of the **pooled** directed
  distances (not MONAI's max of the two directed percentiles); ``assd``: the mean of the pooled
  distances (as MONAI and segcalib; medpy before 0.5 took the mean of the two directed means).

:func:`per_class_scores` tabulates Dice and HD95 (medpy style) per case and class with a choice of
convention for absent classes:

- ``"segcalib"`` (SPEC §4): both empty -> NaN; exactly one empty -> Dice 0, HD95 inf.
- ``"seed"`` (the medical seed papers' evaluation): class absent from the ground truth -> Dice 1
  and HD95 0 whatever was predicted; class present but predicted empty -> Dice 0 and HD95 0. This
  hides false positives and misses from the HD and is not the default.

What the seed code (Bala93/MarginLoss, ``calibrate/evaluation/segment_evaluator.py``) computes
differs again, and :func:`marginloss_hd` reproduces it for comparison with its tables: medpy's full
``hd`` (not HD95) with unit spacing (voxels), per image (per 2D slice for 2D models), and 0 unless
``count_pred & count_gt`` -- a *bitwise* AND of the two voxel counts -- is non-zero, so a class
present in both with counts such as 4 and 8 also scores 0. Its Dice is pooled over the dataset
(summed areas, ``+ 1e-10`` in the denominator), i.e. :class:`SegmentationMetric`'s ``dice_pooled``
except that a class absent everywhere scores 0 instead of NaN.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from segcalib.errors import ConfigError
from segcalib.metrics.inputs import INCLUDE_BACKGROUND, prediction_labels
from segcalib.metrics.surface import linear_percentile
from segcalib.spatial.distance import symmetric_nearest_distances
from segcalib.spatial.morphology import bounding_box, mask_edges
from segcalib.spatial.spacing import BatchSpacingLike, SpacingLike, normalize_spacing, spacing_per_case

CONVENTIONS = ("segcalib", "seed")
MaskLike = torch.Tensor | np.ndarray


def _masks(result: MaskLike, reference: MaskLike) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.as_tensor(result).bool(), torch.as_tensor(reference).bool()
    if a.shape != b.shape:
        raise ValueError(f"result {tuple(a.shape)} and reference {tuple(b.shape)} differ in shape")
    return a, b.to(a.device)


def medpy_dc(result: MaskLike, reference: MaskLike) -> float:
    """``medpy.metric.binary.dc``: Dice of two binary masks; NaN when both are empty."""
    a, b = _masks(result, reference)
    counts = torch.stack([(a & b).sum(), a.sum(), b.sum()]).tolist()
    total = counts[1] + counts[2]
    return 2.0 * counts[0] / total if total else math.nan


def _directed(
    result: MaskLike, reference: MaskLike, voxelspacing: SpacingLike, connectivity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """medpy's ``__surface_distances`` both ways: (result -> reference, reference -> result) in mm."""
    if connectivity != 1:
        raise ConfigError(f"connectivity: only 1 (the cross element) is supported, got {connectivity!r}")
    a, b = _masks(result, reference)
    for name, m in (("result", a), ("reference", b)):
        if not bool(m.any()):
            raise ValueError(f"the {name} mask does not contain any binary object")
    sp = normalize_spacing(voxelspacing, a.dim())
    box = bounding_box(a | b, margin=1)
    a, b = a[box], b[box]
    d_ab, d_ba = symmetric_nearest_distances(mask_edges(a), mask_edges(b), sp)
    return d_ab, d_ba


def medpy_hd(
    result: MaskLike, reference: MaskLike, voxelspacing: SpacingLike = None, connectivity: int = 1
) -> float:
    """``medpy.metric.binary.hd``: max of the two directed maximum surface distances (mm)."""
    d_ab, d_ba = _directed(result, reference, voxelspacing, connectivity)
    return float(torch.maximum(d_ab.max(), d_ba.max()))


def medpy_hd95(
    result: MaskLike, reference: MaskLike, voxelspacing: SpacingLike = None, connectivity: int = 1
) -> float:
    """``medpy.metric.binary.hd95``: 95th percentile (linear) of the pooled surface distances (mm)."""
    d_ab, d_ba = _directed(result, reference, voxelspacing, connectivity)
    return float(linear_percentile(torch.cat([d_ab, d_ba]), 95.0))


def medpy_assd(
    result: MaskLike, reference: MaskLike, voxelspacing: SpacingLike = None, connectivity: int = 1
) -> float:
    """``medpy.metric.binary.assd``: mean of the pooled surface distances of both directions (mm)."""
    d_ab, d_ba = _directed(result, reference, voxelspacing, connectivity)
    return float(torch.cat([d_ab, d_ba]).mean())


def _case_class(pred: torch.Tensor, gt: torch.Tensor, spacing: tuple[float, ...], convention: str) -> tuple[float, float]:
    has_pred, has_gt = (bool(x) for x in torch.stack([pred.any(), gt.any()]).tolist())
    if has_pred and has_gt:
        return medpy_dc(pred, gt), medpy_hd95(pred, gt, spacing)
    if convention == "seed":
        return (1.0, 0.0) if not has_gt else (0.0, 0.0)
    return (math.nan, math.nan) if not (has_pred or has_gt) else (0.0, math.inf)


def per_class_scores(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    spacing: BatchSpacingLike = None,
    include_background: bool = INCLUDE_BACKGROUND,
    convention: str = "segcalib",
) -> dict[str, torch.Tensor]:
    """Dice (medpy ``dc``) and HD95 (medpy ``hd95``, mm) per case and class.

    Args:
        pred: ``(B, C, *spatial)`` probabilities / one-hot, or labels ``(B, *spatial)`` /
            ``(B, 1, *spatial)``.
        target: integer labels ``(B, *spatial)`` or ``(B, 1, *spatial)``.
        num_classes: ``C``.
        spacing: mm per voxel, shared by the batch or one per case.
        include_background: evaluate class 0 too.
        convention: ``"segcalib"`` or ``"seed"`` for absent classes (see the module).

    Returns:
        float64 ``{"dice": (B, C'), "hd95": (B, C')}``.
    """
    if convention not in CONVENTIONS:
        raise ConfigError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    labels, truth = prediction_labels(pred, target, num_classes)
    spacings = spacing_per_case(spacing, labels.shape[0], labels.dim() - 1)
    first = 0 if include_background else 1
    rows = [
        [_case_class(labels[b] == k, truth[b] == k, spacings[b], convention) for k in range(first, num_classes)]
        for b in range(labels.shape[0])
    ]
    values = torch.tensor(rows, dtype=torch.float64).view(labels.shape[0], num_classes - first, 2)
    return {"dice": values[..., 0], "hd95": values[..., 1]}


def marginloss_hd(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """HD per case and class as the MarginLoss evaluator's ``shape_metrics`` (see the module).

    Args:
        pred: ``(B, C, *spatial)`` probabilities / one-hot, or labels ``(B, *spatial)`` /
            ``(B, 1, *spatial)``.
        target: integer labels ``(B, *spatial)`` or ``(B, 1, *spatial)``.
        num_classes: ``C``.

    Returns:
        float64 ``(B, C)`` in voxels, background included (the seed code averages classes ``1..``).
    """
    labels, truth = prediction_labels(pred, target, num_classes)
    rows = []
    for b in range(labels.shape[0]):
        row = []
        for k in range(num_classes):
            p, g = labels[b] == k, truth[b] == k
            n_p, n_g = (int(v) for v in torch.stack([p.sum(), g.sum()]).tolist())
            row.append(medpy_hd(p, g) if n_p & n_g else 0.0)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64).view(labels.shape[0], num_classes)
