"""Shared test settings: deterministic seeds and a small thread count (CI has 2 cores)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def repo_root() -> str:
    return REPO_ROOT


SMOKE_CONFIG = os.path.join(REPO_ROOT, "configs", "smoke.yaml")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory):
    """A finished one-epoch smoke run (trained once per test session), shared read-only."""
    from pathlib import Path

    from segcalib.config import load_config
    from segcalib.runs import RunDir
    from segcalib.training import train

    run = RunDir(Path(tmp_path_factory.mktemp("smoke_run")) / "run")
    train(load_config(SMOKE_CONFIG, ["train.epochs=1"]), run, progress=False)
    return run.root
