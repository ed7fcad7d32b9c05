"""Optimisers and learning-rate schedules by name (``train.optimizer``, ``train.scheduler``).

Schedules are per epoch, with an optional linear warm-up; they are ``LambdaLR`` multipliers so
that their state is plain data in checkpoints.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from segcalib.config.schema import TrainConfig

OPTIMIZERS: dict[str, Callable[[Iterable[torch.nn.Parameter], TrainConfig], torch.optim.Optimizer]] = {
    "adam": lambda params, c: torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay),
    "sgd": lambda params, c: torch.optim.SGD(
        params, lr=c.lr, momentum=c.momentum, nesterov=c.momentum > 0, weight_decay=c.weight_decay
    ),
}


def _constant(epoch: int, c: TrainConfig) -> float:
    return 1.0


def _step(epoch: int, c: TrainConfig) -> float:
    return c.step_gamma ** (epoch // c.step_size)


def _cosine(epoch: int, c: TrainConfig) -> float:
    span = max(1, c.epochs - c.warmup_epochs)
    progress = min(1.0, max(0, epoch - c.warmup_epochs) / span)
    floor = c.min_lr / c.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _poly(epoch: int, c: TrainConfig) -> float:
    span = max(1, c.epochs - c.warmup_epochs)
    progress = min(1.0, max(0, epoch - c.warmup_epochs) / span)
    return (1 - progress) ** c.poly_power


SCHEDULES: dict[str, Callable[[int, TrainConfig], float]] = {
    "none": _constant,
    "step": _step,
    "cosine": _cosine,
    "poly": _poly,
}


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.optimizer](params, cfg)


def lr_multiplier(epoch: int, cfg: TrainConfig) -> float:
    """Learning-rate factor for 0-based ``epoch`` (warm-up, then the named schedule)."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    return SCHEDULES[cfg.scheduler](epoch, cfg)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_multiplier(epoch, cfg))
