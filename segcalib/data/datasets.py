"""Cached MONAI datasets for training patches and whole evaluation volumes."""

from __future__ import annotations

import os
from typing import Sequence

from monai.data import CacheDataset

from segcalib.config.schema import DataConfig
from segcalib.data.manifest import Case
from segcalib.data.transforms import case_to_item, preprocessing, training_transforms


def _cache_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def training_dataset(cfg: DataConfig, cases: Sequence[Case]) -> CacheDataset:
    """Random patches (3D) or slices (2D); the deterministic prefix is cached in memory."""
    return CacheDataset(
        [case_to_item(c) for c in cases],
        transform=training_transforms(cfg),
        cache_rate=cfg.cache_rate,
        num_workers=_cache_workers(),
        progress=False,
    )


def volume_dataset(cfg: DataConfig, cases: Sequence[Case], with_label: bool = True, cache: bool = True) -> CacheDataset:
    """Whole preprocessed volumes (validation, export, temperature fitting)."""
    return CacheDataset(
        [case_to_item(c) for c in cases],
        transform=preprocessing(cfg, with_label=with_label),
        cache_rate=cfg.cache_rate if cache else 0.0,
        num_workers=_cache_workers(),
        progress=False,
    )
