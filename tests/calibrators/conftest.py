"""Calibrator fits are thousands of tiny tensor operations: one intra-op thread is much faster for
them than two threads contending on a shared machine (the thread count is restored afterwards)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
