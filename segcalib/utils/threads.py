"""How many intra-op threads torch may use for a stretch of small CPU work."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

FIT_THREADS = 1  # calibrator fits: many passes over ~10^5-10^6 rows of C values


@contextlib.contextmanager
def cpu_threads(n: int = FIT_THREADS) -> Iterator[None]:
    """Run the block with at most ``n`` torch intra-op threads, then restore the previous number.

    Why: a calibrator fit is hundreds of short passes over a voxel sample. Extra threads gain little
    on such small operations, and on a machine where another CPU-bound job runs they oversubscribe
    the cores: ``calibrate fit --method auto`` on 16 hippocampus maps took 99 s with torch's 2 threads
    on 2 busy cores and 34 s with one (benchmarks/bench_calibrators.py, docs/benchmarks.md).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
