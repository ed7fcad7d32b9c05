"""One case of ``segcalib evaluate``: read its maps, feed the streamed metrics, return its report row
(and, for the HTML report, its slice view as a data URI)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

from segcalib.data import Case, VolumeHeader, read_volume
from segcalib.errors import DataError
from segcalib.metrics import AdaptiveCalibrationError, CalibrationMetric, dice, surface_distances_per_class
from segcalib.predictions import PredictionFolder, check_geometry
from segcalib.predictions.matching import check_label_values
from segcalib.reports.protocols import Protocol
from segcalib.reports.slices import case_view_uri
from segcalib.reports.uncertainty_report import UncertaintyReport, uncertainty_maps

VIEW_MAP = "entropy"  # the uncertainty shown in the case views


class CaseInputs(NamedTuple):
    """A case's maps and label as read and checked, the tensors on the evaluation device."""

    probs: torch.Tensor  # (1, K, *spatial) float32
    label: torch.Tensor  # (1, *spatial) int64
    label_np: np.ndarray
    label_header: VolumeHeader


def read_case(
    case: Case, folder: PredictionFolder, num_classes: int, device: torch.device, ignore: int | None = None
) -> CaseInputs:
    """Read and check the case's label (classes ``0..K-1`` or ``ignore``) and its maps from ``folder``."""
    label_np, label_header = read_volume(case.label, dtype=np.int64)
    check_label_values(label_np, num_classes, ignore, case.label)
    probs = case_probabilities(folder, case, num_classes, label_header).to(device)
    return CaseInputs(probs, torch.from_numpy(label_np).to(device).unsqueeze(0), label_np, label_header)


def evaluate_case(
    case: Case,
    folder: PredictionFolder,
    num_classes: int,
    metric: CalibrationMetric,
    device: torch.device,
    protocol: Protocol,
    uncertainty: UncertaintyReport | None,
    with_view: bool,
    equal_mass: AdaptiveCalibrationError | None = None,
    conformal: dict[str, Any] | None = None,
    inputs: CaseInputs | None = None,
) -> tuple[dict[str, Any], str | None]:
    """The case's row (Dice and surface distances per foreground class, protocol values, mean
    uncertainties) and its view (``None`` unless ``with_view``); the streamed states are updated.
    ``folder``: the prediction folder, any registered format, read as it is (a segcalib export's
    probabilities, another model's maps; logits through a softmax). ``conformal``: a
    ``conformal.json`` record whose foreground masks the view outlines. ``inputs``: the case as
    :func:`read_case` read it (read here when None)."""
    predictions = folder.root
    ignore = metric.ignore_index  # nnU-Net's ignore label (the manifest's), or None
    if inputs is None:
        inputs = read_case(case, folder, num_classes, device, ignore)
    probs, label, label_np, label_header = inputs
    spacing = list(label_header.spacing)
    metric.update(probs, label, spacing=spacing, case_ids=[case.case_id])  # leaves ignored voxels out
    valid = None if ignore is None else label != ignore
    if equal_mass is not None:  # voxel-wise: the kept voxels as one flat case
        equal_mass.update(*((probs, label) if valid is None else (probs[:, :, valid[0]], label[valid].unsqueeze(0))))
    pred = probs.argmax(1)
    if valid is not None:  # ignored voxels are background in both masks: in no foreground class's Dice
        pred, label = pred.masked_fill(~valid, 0), label.masked_fill(~valid, 0)
        label_np = np.where(label_np == ignore, 0, label_np)
    per_class_dice = dice(pred, label, num_classes, include_background=False)[0].tolist()
    distances = surface_distances_per_class(pred[0], label[0], num_classes, spacing, include_background=False)
    classes = [
        {"class": k, "dice": float(per_class_dice[k - 1]), **{m: float(v) for m, v in d.items()}}
        for k, d in enumerate(distances, start=1)
    ]
    row: dict[str, Any] = {"case": case.case_id, "spacing": spacing, "classes": classes}
    protocol_values = protocol.case_values(probs, label, num_classes)
    if protocol_values:
        row["protocol"] = protocol_values
    maps: dict[str, torch.Tensor] = {}
    if uncertainty is not None:
        maps = uncertainty_maps(uncertainty.maps, probs, case.case_id, predictions, label_header)
        row["uncertainty"] = uncertainty.update(maps, pred, label, spacing, valid)
    view = None
    if with_view:
        band = None
        if conformal is not None:
            from segcalib.conformal.evaluation import foreground_band

            band = foreground_band(conformal, probs[0].cpu().numpy(), tuple(spacing))
        view = _view(case, label_np, label_header, pred, probs, maps.get(VIEW_MAP), num_classes, band)
    return row, view


def _view(
    case: Case,
    label: np.ndarray,
    header: VolumeHeader,
    pred: torch.Tensor,
    probs: torch.Tensor,
    uncertainty: torch.Tensor | None,
    num_classes: int,
    band: tuple[np.ndarray | None, np.ndarray] | None = None,
) -> str:
    """The case's three-plane view: its first image channel, outlines (and the conformal band),
    P(foreground), entropy."""
    image, image_header = read_volume(case.images[0], dtype=np.float32)
    if image.ndim == 4:
        image = image[..., 0]
    if image.shape != label.shape:
        raise DataError(f"case {case.case_id}: image {case.images[0]} has shape {image.shape}, the label {label.shape}")
    foreground = (1.0 - probs[0, 0]).cpu().numpy()
    return case_view_uri(
        image,
        header.affine,
        label,
        pred[0].cpu().numpy(),
        foreground,
        None if uncertainty is None else uncertainty[0].cpu().numpy(),
        uncertainty_name="entropy (nats)",
        uncertainty_range=(0.0, math.log(num_classes)),
        band=band,
    )


def case_probabilities(folder: PredictionFolder, case: Case, num_classes: int, label_header: VolumeHeader) -> torch.Tensor:
    """``(1, K, *spatial)`` float32 probabilities of ``case`` (softmax of logits), checked to lie on
    the label's voxels with the manifest's classes."""
    pred = folder.read(case.case_id)
    check_geometry(pred, label_header, num_classes)
    values = torch.from_numpy(np.ascontiguousarray(pred.values, dtype=np.float32)).unsqueeze(0)
    if pred.kind == "logits":
        return torch.softmax(values, dim=1)
    return values.clamp_(0, 1)
