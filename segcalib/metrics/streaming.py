"""Cross-process views of metric state for ``compute()``: summed copies and gathered rows.

``compute()`` of the metrics in this package syncs under ``torch.distributed`` itself but leaves
the local state untouched, so that ``update`` may continue afterwards and a second ``compute``
does not count twice. In one process both helpers return their input.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from segcalib.utils.distributed import all_reduce_sum, is_distributed


def summed_copy(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over all processes, as a new tensor (``tensor`` itself in one process)."""
    if not is_distributed():
        return tensor
    return all_reduce_sum(tensor.clone())


def gathered_rows(rows: list[Any]) -> list[Any]:
    """The concatenation, in rank order, of every process's ``rows`` (picklable Python values)."""
    if not is_distributed():
        return list(rows)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(rows))
    return [row for part in parts for row in part]
