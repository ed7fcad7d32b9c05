"""Producing case i+1 overlapped with the work on case i (metrics, losses).

:func:`overlapped` runs ``infer`` on the caller's thread and ``finish`` on one worker thread, one
case behind: while ``finish(case_i, out_i)`` computes metrics, ``infer(case_{i+1})`` already runs
the sliding window (validation) or reads the next prediction (``segcalib evaluate``). ``finish`` sees the cases one at a time, in order, so whatever it adds up
(metric states, sums) comes out exactly as in a plain loop; at most two outputs are alive.

On a GPU the worker runs on its own CUDA stream: it waits for an event recorded after ``infer``
(so it never reads an unfinished output), marks the output as used on its stream (so the caching
allocator does not hand that memory back to the caller's stream early), and the caller's stream
waits for the worker's before :func:`overlapped` returns (so what ``finish`` accumulated is ready).
The outputs stay on the device: nothing is copied to the host here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

Case = TypeVar("Case")
Outputs = tuple  # its tensor items are guarded on a GPU; other items pass as they are


def overlapped(
    cases: Iterable[Case],
    infer: Callable[[Case], Outputs],
    finish: Callable[[Case, Outputs], None],
    enabled: bool = True,
    device: torch.device | str | None = None,
) -> None:
    """``finish(case, infer(case))`` for every case, in order; overlapped unless ``enabled`` is False.

    ``infer`` returns a tuple (its tensors on ``device``, which selects the CUDA stream handling;
    other items, such as headers, pass as they are). An exception in either function stops the loop and is raised here, after the worker
    has finished its case.
    """
    if not enabled:
        for case in cases:
            finish(case, infer(case))
        return
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device) if cuda else None
    grad_enabled = torch.is_grad_enabled()  # grad mode is per thread: the worker takes the caller's
    pending: Future | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="segcalib-finish") as worker:  # leaving waits for it
        for case in cases:
            outputs = infer(case)
            ready = None
            if cuda:
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(device))
            if pending is not None:
                pending.result()  # one case behind, never more; raises the worker's exception
            pending = worker.submit(_finish_one, finish, case, outputs, grad_enabled, side, ready)
            del outputs
        if pending is not None:
            pending.result()
    if cuda:
        torch.cuda.current_stream(device).wait_stream(side)


def _finish_one(finish, case, outputs: Outputs, grad_enabled: bool, side, ready) -> None:
    with torch.set_grad_enabled(grad_enabled):
        if side is None:
            finish(case, outputs)
            return
        with torch.cuda.stream(side):
            side.wait_event(ready)
            for item in outputs:
                if isinstance(item, torch.Tensor) and item.device.type == "cuda":
                    item.record_stream(side)
            finish(case, outputs)
