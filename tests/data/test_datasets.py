"""Worker counts of the data pipeline: cache threads from the core count, patch workers per device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segcalib.config import DataConfig
from segcalib.data import datasets


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 2), (6, 6), (64, 8)])
def test_cache_threads_default_to_one_per_core_up_to_eight(monkeypatch, cores: int, expected: int) -> None:
    monkeypatch.setattr(datasets, "available_cores", lambda: cores)
    assert datasets.cache_workers(DataConfig(manifest=Path("m.json"))) == expected
    assert datasets.cache_workers(DataConfig(manifest=Path("m.json"), cache_workers=3)) == 3


def test_patch_workers_are_processes_on_the_cpu_only() -> None:
    cfg = DataConfig(manifest=Path("m.json"), num_workers=4)
    assert datasets.patch_workers(cfg, torch.device("cpu")) == 4
    assert datasets.patch_workers(cfg, torch.device("cuda", 1)) == 0
    assert datasets.patch_workers(DataConfig(manifest=Path("m.json")), torch.device("cpu")) == 0
