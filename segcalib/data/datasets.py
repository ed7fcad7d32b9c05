"""Cached MONAI datasets for training patches and whole evaluation volumes.

Training follows MONAI's fast-training recipe: the deterministic half of the chain
(:func:`~segcalib.data.transforms.training_volume_transforms`) runs once per case into an
in-memory :class:`~monai.data.CacheDataset`, built anew by every run from its own config (so a
changed config never meets an old cache); :class:`PatchDataset` then moves each cached volume to
the training device and runs the random half there (crops, flips, intensity).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from monai import transforms as mt
from monai.data import CacheDataset

from segcalib.config.schema import DataConfig
from segcalib.data.manifest import Case
from segcalib.data.transforms import case_to_item, patch_transforms, preprocessing, training_volume_transforms

MAX_DEFAULT_CACHE_WORKERS = 8


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def cache_workers(cfg: DataConfig) -> int:
    """Threads that fill the cache: ``data.cache_workers``, by default one per core up to 8.
    The number changes only how fast the cache fills, never what it holds."""
    if cfg.cache_workers is not None:
        return cfg.cache_workers
    return min(MAX_DEFAULT_CACHE_WORKERS, available_cores())


def patch_workers(cfg: DataConfig, device: torch.device) -> int:
    """Worker processes for the random patch transforms: ``data.num_workers`` on the CPU; none on a
    GPU, where those transforms run on the device in the loader's thread (CUDA does not work in
    forked workers, and the GPU is faster at them)."""
    return cfg.num_workers if torch.device(device).type == "cpu" else 0


class PatchDataset(torch.utils.data.Dataset):
    """Random patches of cached volumes: item ``i`` is a list of ``samples_per_volume`` dicts.

    ``set_random_state`` seeds the random chain alone, as MONAI's loaders seed a dataset's
    transforms, so a seed gives the same patches as the whole chain run uncached.
    """

    def __init__(self, volumes: CacheDataset, transform: mt.Compose) -> None:
        self.volumes = volumes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> Any:
        # a shallow copy: the random transforms make new tensors (a crop may be a view of the
        # cache, nothing writes into it) and never touch the cached dict itself
        return self.transform(dict(self.volumes[index]))

    def set_random_state(self, seed: int | None = None, state: Any = None) -> "PatchDataset":
        self.transform.set_random_state(seed=seed, state=state)
        return self


def training_dataset(cfg: DataConfig, cases: Sequence[Case], device: torch.device | str = "cpu") -> PatchDataset:
    """Random patches (3D) or slices (2D) on ``device``; the deterministic half is cached in memory."""
    volumes = CacheDataset(
        [case_to_item(c) for c in cases],
        transform=training_volume_transforms(cfg),
        cache_rate=cfg.cache_rate,
        num_workers=cache_workers(cfg),
        progress=False,
    )
    return PatchDataset(volumes, patch_transforms(cfg, torch.device(device)))


def volume_dataset(cfg: DataConfig, cases: Sequence[Case], with_label: bool = True, cache: bool = True) -> CacheDataset:
    """Whole preprocessed volumes (validation, export, temperature fitting)."""
    return CacheDataset(
        [case_to_item(c) for c in cases],
        transform=preprocessing(cfg, with_label=with_label),
        cache_rate=cfg.cache_rate if cache else 0.0,
        num_workers=cache_workers(cfg),
        progress=False,
    )
