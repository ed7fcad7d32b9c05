"""Training batches of patches: exactly ``train.batch_size`` patches per step, drawn from a seed of
the epoch alone (so a resumed run repeats the epochs an uninterrupted one would have run).

Batches come from MONAI's ``ThreadDataLoader``: a thread prepares the next batch (on the training
device, see :func:`segcalib.data.datasets.training_dataset`) while the current one trains.
``threaded=False`` is the loader before it (a plain ``DataLoader``), kept for the comparison in
``benchmarks/bench_training.py`` and the parity test; both give the same batches for a seed."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from monai.data import DataLoader, ThreadDataLoader
from torch.utils.data import DistributedSampler

from segcalib.config.schema import ExperimentConfig
from segcalib.utils.distributed import is_distributed, world_size


def patch_batches(
    dataset,
    cfg: ExperimentConfig,
    epoch_seed: int,
    epoch: int,
    pin_memory: bool = False,
    workers: int | None = None,
    threaded: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(image, label)`` batches of ``train.batch_size`` patches (the last may be smaller unless
    ``train.iterations_per_epoch`` fixes the count), each volume giving ``samples_per_volume``.

    ``workers``: loader worker processes (default ``data.num_workers``; 0 when the dataset's random
    transforms run on a GPU)."""
    batch_size = cfg.train.batch_size
    volumes_per_load = max(1, batch_size // cfg.data.samples_per_volume)
    limit = cfg.train.iterations_per_epoch
    produced, cycle = 0, 0
    pending_images: list[torch.Tensor] = []
    pending_labels: list[torch.Tensor] = []
    while True:
        loader = _loader(
            dataset, cfg, volumes_per_load, seed=epoch_seed + 7919 * cycle, shard_epoch=epoch * 1000 + cycle,
            pin_memory=pin_memory, workers=cfg.data.num_workers if workers is None else workers, threaded=threaded,
        )
        batches = iter(loader)
        try:
            for batch in batches:
                pending_images.extend(_plain(batch["image"]))
                pending_labels.extend(_plain(batch["label"]))
                while len(pending_images) >= batch_size:
                    yield torch.stack(pending_images[:batch_size]), torch.stack(pending_labels[:batch_size])
                    del pending_images[:batch_size], pending_labels[:batch_size]
                    produced += 1
                    if limit is not None and produced >= limit:
                        return
        finally:
            # stop (and join) the loader's thread before anything else draws from the same
            # random transforms: the next cycle or epoch reseeds them
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        cycle += 1
        if limit is None:
            if pending_images:
                yield torch.stack(pending_images), torch.stack(pending_labels)
            return


def steps_per_epoch(dataset, cfg: ExperimentConfig) -> int:
    """Optimiser steps in one epoch (this process's share of the patches under DDP)."""
    if cfg.train.iterations_per_epoch:
        return cfg.train.iterations_per_epoch
    patches = math.ceil(len(dataset) / world_size()) * cfg.data.samples_per_volume
    return math.ceil(patches / cfg.train.batch_size)


def _plain(x) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def _loader(
    dataset, cfg: ExperimentConfig, volumes: int, seed: int, shard_epoch: int, pin_memory: bool, workers: int, threaded: bool
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if is_distributed():
        sampler = DistributedSampler(dataset, shuffle=True, seed=cfg.train.seed, drop_last=False)
        sampler.set_epoch(shard_epoch)
    options = dict(
        batch_size=volumes,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=workers,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
    if threaded:
        return ThreadDataLoader(dataset, buffer_size=1, **options)
    return DataLoader(dataset, **options)
