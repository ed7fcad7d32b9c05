"""Validation on whole volumes: sliding-window logits -> loss, Dice per class, pooled ECE.

The same logits (and labels) feed an adaptive loss's outer update (CALS / CRaC ``accumulate``), so validation and
the multiplier update cost one forward pass. Under DDP every process takes its share of the
cases; sums are all-reduced and per-case Dice values gathered, so the result equals one process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from segcalib.inference.sliding_window import SlidingWindow, predict_logits
from segcalib.metrics import CalibrationMetric, dice
from segcalib.spatial.regions import ALL
from segcalib.utils.distributed import all_reduce_sum, gather_objects
from segcalib.utils.overlap import overlapped


@dataclass
class ValidationResult:
    loss: float
    dice_per_class: list[float]  # mean over cases of each class's Dice (index = label value)
    ece: float
    nll: float
    n_cases: int
    per_case_dice: list[list[float]] = field(default_factory=list)

    @property
    def dice_fg_mean(self) -> float:
        """Mean foreground Dice (classes 1..C-1; NaN classes excluded)."""
        values = [v for v in self.dice_per_class[1:] if not math.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    def score(self, metric: str) -> float:
        """A value where larger is better for ``train.best_metric``."""
        return {"dice": self.dice_fg_mean, "ece": -self.ece, "nll": -self.nll, "loss": -self.loss}[metric]

    def as_row(self, class_names: list[str]) -> dict[str, float]:
        row = {"val_loss": self.loss, "val_dice_fg_mean": self.dice_fg_mean, "val_ece": self.ece, "val_nll": self.nll}
        for index, name in enumerate(class_names):
            if index > 0:
                row[f"val_dice_{name}"] = self.dice_per_class[index]
        return row


@torch.no_grad()
def validate(
    net: nn.Module,
    volumes: Sequence[dict],
    window: SlidingWindow,
    loss_fn: nn.Module,
    num_classes: int,
    device: torch.device,
    update_adaptive_loss: bool = False,
    adaptive_slice_axis: int | None = None,
    overlap: bool = True,
) -> ValidationResult:
    """Evaluate ``net`` (a function of 3D windows) on preprocessed volumes with labels.

    ``adaptive_slice_axis`` (2D training): the adaptive loss's update sees each volume as the batch
    of its slices along that axis, the images it was trained on (CRaC's windows and regions are 2D).
    ``overlap``: the loss and metrics of case i run on a worker thread while case i+1 is predicted
    (:func:`segcalib.utils.overlap.overlapped`); the numbers are the same either way.
    """
    was_training = net.training
    net.eval()
    metric = CalibrationMetric(num_classes, regions=(ALL,), per_case=False)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    voxels = torch.zeros((), dtype=torch.float64, device=device)
    per_case: list[list[float]] = []

    def infer(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = volumes[index]
        image = _batched(item["image"]).to(device)
        label = _batched(item["label"]).to(device).long()
        return predict_logits(net, image, window, device=device).to(device), label

    def finish(index: int, outputs: tuple[torch.Tensor, torch.Tensor]) -> None:
        nonlocal loss_sum, voxels
        logits, label = outputs
        n = float(label.numel())
        loss_sum += loss_fn(logits, label).double() * n
        voxels += n
        if update_adaptive_loss:
            if adaptive_slice_axis is None:
                loss_fn.accumulate(logits, label)
            else:
                loss_fn.accumulate(_slices(logits, adaptive_slice_axis), _slices(label, adaptive_slice_axis))
        probs = torch.softmax(logits, dim=1)
        metric.update(probs, label)
        per_case.append(dice(probs.argmax(1), label[:, 0], num_classes)[0].tolist())

    # a process's share may be empty under DDP; the metrics of a case run while the next is predicted
    overlapped(range(len(volumes)), infer, finish, enabled=overlap, device=device)
    net.train(was_training)

    all_reduce_sum(loss_sum)
    all_reduce_sum(voxels)
    per_case = [row for part in gather_objects(per_case) for row in part]
    stats = metric.compute()[ALL]
    table = np.array(per_case, dtype=np.float64).reshape(-1, num_classes)
    with np.errstate(invalid="ignore"):
        dice_per_class = [float(np.nanmean(col)) if np.isfinite(col).any() else float("nan") for col in table.T]
    return ValidationResult(
        loss=float(loss_sum / voxels.clamp(min=1)),
        dice_per_class=dice_per_class,
        ece=stats.ece,
        nll=stats.nll,
        n_cases=len(per_case),
        per_case_dice=per_case,
    )


def _batched(x: torch.Tensor) -> torch.Tensor:
    """A ``(C, *spatial)`` tensor from a dataset item as ``(1, C, *spatial)``."""
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return x.unsqueeze(0)


def _slices(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``(1, C, *spatial3d)`` -> ``(S, C, *spatial2d)``: the slices along spatial ``axis`` as a batch."""
    return x[0].movedim(1 + axis, 0)
