"""A fixture running a test module on one intra-op thread: with 2 cores shared by many processes, two
OpenMP threads spin-wait on each other and small L-BFGS / conv fits run 10x slower than on one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
