"""Shared test settings: deterministic seeds, a small thread count (CI has 2 cores), and the
``cuda`` marker, set on every test whose skipif mentions CUDA or a GPU (``pytest -m cuda``)."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CUDA_WORDS = re.compile(r"\b(cuda|gpu)\b", re.IGNORECASE)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device; set on every test whose skipif mentions CUDA/GPU")


def needs_cuda(item: pytest.Item) -> bool:
    """Whether a skipif of the test (its reason, or a string condition) mentions CUDA or a GPU."""
    for mark in item.iter_markers("skipif"):
        texts = [str(mark.kwargs.get("reason", ""))] + [a for a in mark.args if isinstance(a, str)]
        if any(_CUDA_WORDS.search(text) for text in texts):
            return True
    return False


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("cuda") is None and needs_cuda(item):
            item.add_marker(pytest.mark.cuda)


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
