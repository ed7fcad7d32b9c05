"""A trained model stand-in whose maps follow the image: logits ``(0, x, -x)`` of the normalised
intensity, so exported maps can be checked voxel by voxel without training."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from segcalib.inference.sliding_window import SlidingWindow
from segcalib.inference.trained_model import TrainedModel


class IntensityEcho(nn.Module):
    """Logits (0, x, -x): the class-1 probability follows the normalised intensity at the same voxel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), x, -x], dim=1)


def echo_model(cfg) -> TrainedModel:
    """:class:`IntensityEcho` as a 3-class :class:`TrainedModel` of ``cfg`` on the CPU (8³ windows)."""
    return TrainedModel(
        cfg=cfg, net=IntensityEcho(), window=SlidingWindow(roi_size=[8, 8, 8], overlap=0.5),
        checkpoint=Path("none"), epoch=0, num_classes=3, class_names=["bg", "a", "b"], config_hash="x",
        device=torch.device("cpu"),
    )
