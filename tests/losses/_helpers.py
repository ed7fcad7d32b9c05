"""Small builders shared by the loss tests."""

from __future__ import annotations

import torch

from segcalib.losses import REQUIRED, build_loss, loss_parameters

NUM_CLASSES = 3
SHAPES = {"2d": (2, NUM_CLASSES, 6, 7), "3d": (2, NUM_CLASSES, 4, 5, 3)}


def make_loss(name: str, num_classes: int = NUM_CLASSES, **params):
    """``build_loss`` with the data-given ``num_classes`` filled in where the loss needs it."""
    if loss_parameters(name).get("num_classes") is REQUIRED:
        params.setdefault("num_classes", num_classes)
    return build_loss(name, **params)


def random_batch(shape, dtype=torch.float32, scale: float = 3.0, seed: int = 0, device: str = "cpu"):
    """Logits ``shape`` and int64 targets ``(B, *spatial)`` drawn with a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
    return logits.to(device), target.to(device)
