"""Synthetic, deliberately miscalibrated segmentation outputs for the calibrator tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_CLASSES = 3
SHAPES = {"2d": (2, NUM_CLASSES, 9, 8), "3d": (2, NUM_CLASSES, 5, 6, 4)}


def miscalibrated(shape, seed: int = 0, dtype=torch.float32, overconfidence: float = 2.5):
    """``(logits (B, C, *S), target (B, *S), image (B, 1, *S))``: the target is drawn from a true
    softmax(u) that has class-dependent offsets; the logits are ``overconfidence * u`` plus a class bias,
    so every calibrator has something to correct and the labels are not independent of the logits."""
    gen = torch.Generator().manual_seed(seed)
    b, c, *spatial = shape
    u = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5
    u = u + torch.linspace(0.5, -0.5, c, dtype=torch.float64).reshape(1, c, *([1] * len(spatial)))
    probs = F.softmax(u, dim=1).movedim(1, -1).reshape(-1, c)
    target = torch.multinomial(probs, 1, generator=gen).reshape(b, *spatial)
    logits = overconfidence * u + torch.linspace(-0.3, 0.3, c, dtype=torch.float64).reshape(1, c, *([1] * len(spatial)))
    image = torch.randn((b, 1, *spatial), generator=gen, dtype=torch.float64)
    return logits.to(dtype), target, image.to(dtype)


def unit_spacing(batch: int, ndim: int) -> list[tuple[float, ...]]:
    return [(1.0,) * ndim for _ in range(batch)]


def mean_nll(probs: torch.Tensor, target: torch.Tensor) -> float:
    """Mean NLL (nats) of probabilities ``(B, C, *S)`` against ``target (B, *S)``, in float64."""
    return float(F.nll_loss(probs.double().clamp_min(1e-300).log(), target))
