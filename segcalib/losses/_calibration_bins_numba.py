"""CPU kernels for :mod:`segcalib.losses._calibration_bins`, compiled with numba when it is installed.

The torch path of the cell moments needs about ten ATen calls per chunk of voxels and class (a
float64 position, its truncation, two or three ``bincount``), all on one core. These kernels do
the same arithmetic in one loop per (image, class) row, and spread the rows, cut into parts, over
``torch.get_num_threads()`` Python threads (numba releases the GIL; no OpenMP team is made, so
torch's own threads are not oversubscribed). Same float64 position, same truncation, so the same
slot for every voxel; the sums differ from the torch path's only in the order of addition.

numba is the optional ``fast-cpu`` extra; without it (or with ``SEGCALIB_NUMBA=0``) the torch path
runs. The kernels are compiled on first use in each process (a second or two), never cached to
disk.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

MIN_PART = 1 << 16
"""Voxels per part at least: below this a thread hand-off costs more than it saves."""
MAX_PARTS = 64
"""Parts per row at most (each part has its own small table of moments)."""
_LANES = 4
"""Interleaved accumulators: consecutive voxels often share a slot, and one accumulator would make
each addition wait for the previous one."""


@functools.cache
def _numba() -> Any:
    """The numba module, imported on first use (importing it takes a fifth of a second that no
    other command should pay), or None when it is missing or does not import (e.g. a numba older
    than the installed NumPy), which is said once."""
    if importlib.util.find_spec("numba") is None:
        log.info("L1-ACE bins on the CPU use the torch path; pip install 'segcalib[fast-cpu]' (numba) "
                 "makes the loss 1.2-1.5x faster")
        return None
    try:
        import numba
    except Exception as exc:  # numba raises ImportError, but also others, on a mismatched NumPy
        log.warning("numba is installed but does not import (%s); L1-ACE bins on the CPU use the torch path", exc)
        return None
    return numba


def available() -> bool:
    """Whether the numba kernels can run: numba importable, and not switched off by ``SEGCALIB_NUMBA``
    set to ``0``, ``false``, ``no`` or ``off``."""
    switched_off = os.environ.get("SEGCALIB_NUMBA", "1").strip().lower() in ("0", "false", "no", "off")
    return not switched_off and _numba() is not None


@functools.cache
def _kernels(soft: bool) -> tuple[Callable[..., None], Callable[..., None]]:
    """The moments and gather kernels, ``soft`` frozen in (numba treats a closure's variables as
    constants, so the hard kernels carry no branch and no third moment)."""
    numba = _numba()
    moments = 3 if soft else 2

    @numba.njit(nogil=True, boundscheck=False, cache=False, inline="always")
    def add(lanes, lane, value, code, code_term, scale):  # pragma: no cover - compiled
        """Add one probability ``value`` (in [0, 1], or NaN) of label code ``code`` to ``lanes[lane]``;
        its slot. A NaN is binned as 0 (a select, not a branch), so that nothing is written out of
        bounds, and summed as it is, so that it reaches the loss, as on the torch path."""
        slot = np.int64(code_term[code] + scale * (value if value == value else 0.0))
        lanes[lane, 0, slot] += 1.0
        lanes[lane, 1, slot] += value
        if soft:
            lanes[lane, 2, slot] += value * value
        return slot

    @numba.njit(nogil=True, boundscheck=False, cache=False)
    def moments_kernel(p, codes, start, stop, code_term, scale, slots, out):  # pragma: no cover - compiled
        """One part ``[start, stop)`` of one row: ``slots[i] = trunc(code_term[codes[i]] + scale p[i])``;
        ``out[k, slot] += p^k`` (k = 0, 1 and, soft, 2), float64."""
        lanes = np.zeros((_LANES, moments, out.shape[1]))
        i = start
        while i + _LANES <= stop:
            for lane in range(_LANES):
                slots[i + lane] = add(lanes, lane, np.float64(p[i + lane]), codes[i + lane], code_term, scale)
            i += _LANES
        for j in range(i, stop):
            slots[j] = add(lanes, 0, np.float64(p[j]), codes[j], code_term, scale)
        for lane in range(_LANES):
            out += lanes[lane]

    @numba.njit(nogil=True, boundscheck=False, cache=False)
    def gather_kernel(p, slots, start, stop, g_sum, g_square, grad):  # pragma: no cover - compiled
        """``grad[i] = g_sum[slot] (+ g_square[slot] p[i], soft)`` on one part of one row."""
        for i in range(start, stop):
            slot = slots[i]
            if soft:
                grad[i] = g_sum[slot] + g_square[slot] * p[i]
            else:
                grad[i] = g_sum[slot]

    return moments_kernel, gather_kernel


@functools.cache
def _codes_kernel() -> Callable[..., int]:
    numba = _numba()

    @numba.njit(nogil=True, boundscheck=False, cache=False)
    def codes_kernel(target, start, stop, ignore_index, classes, codes):  # pragma: no cover - compiled
        """``codes[i] = target[i]``, or ``classes`` where ``target[i] == ignore_index``; the number
        of labels outside ``[0, classes)`` that are not ``ignore_index`` (their codes are left 0)."""
        bad = 0
        for i in range(start, stop):
            label = target[i]
            if label == ignore_index:
                codes[i] = classes
            elif label < 0 or label >= classes:
                codes[i] = 0
                bad += 1
            else:
                codes[i] = label
        return bad

    return codes_kernel


_pool: tuple[ThreadPoolExecutor, int] | None = None
_pool_lock = threading.Lock()


def _run(jobs: list[Callable[[], Any]]) -> None:
    """Run ``jobs`` on ``torch.get_num_threads()`` threads (inline with one)."""
    global _pool
    threads = min(torch.get_num_threads(), len(jobs))
    if threads <= 1:
        for job in jobs:
            job()
        return
    with _pool_lock:
        if _pool is None or _pool[1] < threads:
            if _pool is not None:
                _pool[0].shutdown(wait=False)
            _pool = (ThreadPoolExecutor(max_workers=threads, thread_name_prefix="segcalib-bins"), threads)
        pool = _pool[0]
    groups = [jobs[k::threads] for k in range(threads)]
    futures = [pool.submit(lambda group=group: [job() for job in group]) for group in groups]
    wait(futures)  # every group done (or failed) before the caller's buffers are given up
    for future in futures:
        future.result()


def _forget_pool() -> None:
    """In a forked child: the parent's pool has no threads there; start afresh rather than rely on
    how the executor copes with that. (torch's own OpenMP ops hang in a child forked after the
    parent used several threads, so the loss itself needs ``torch.set_num_threads(1)`` there, as
    DataLoader workers do, and then runs the kernels inline.)"""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _parts(voxels: int) -> list[tuple[int, int]]:
    """``[start, stop)`` parts of a row of ``voxels``, ``MIN_PART`` voxels or more each. The split
    depends on the row's length only, never on the thread count, so the sums are the same bits with
    any number of threads."""
    count = max(1, min(MAX_PARTS, voxels // MIN_PART))
    step = -(-voxels // count)
    return [(start, min(start + step, voxels)) for start in range(0, voxels, step)]


def _each_part(rows: list[Any], voxels: int, call: Callable[[Any, int, int, int], None]) -> None:
    """``call(row, k, start, stop)`` for every part ``k`` (:func:`_parts`) of every row, spread over the threads."""
    parts = _parts(voxels)
    _run([functools.partial(call, row, k, start, stop) for row in rows for k, (start, stop) in enumerate(parts)])


def usable(probs: Tensor) -> bool:
    """Whether the kernels take ``probs``: float32 / float64 on the CPU, numba available."""
    return probs.device.type == "cpu" and probs.dtype in (torch.float32, torch.float64) and available()


def label_codes(target: Tensor, ignore_index: int, classes: int) -> Tensor:
    """``(B, N)`` label codes, one byte each up to 254 classes: the label, ``classes`` on ignored
    voxels. One pass, instead of a ``!=`` mask, an ``all`` and a masked copy.

    Raises:
        ValueError: a label outside ``[0, classes)`` that is not ``ignore_index``.
    """
    batch, voxels = target.shape
    codes = torch.empty(batch, voxels, dtype=torch.uint8 if classes < 255 else torch.int32)
    source, out, kernel = target.contiguous().numpy(), codes.numpy(), _codes_kernel()
    bad = np.zeros((batch, len(_parts(voxels))), dtype=np.int64)

    def part(b: int, k: int, start: int, stop: int) -> None:
        bad[b, k] = kernel(source[b], start, stop, ignore_index, classes, out[b])

    _each_part(list(range(batch)), voxels, part)
    if bad.any():
        raise ValueError(
            f"L1-ACE: {int(bad.sum())} label(s) outside [0, {classes}) that are not ignore_index ({ignore_index})"
        )
    return codes


def cell_moments(
    probs: Tensor, codes: Tensor, code_term: Tensor, scale: float, soft: bool, slots: Tensor, block: int
) -> Tensor:
    """The moments ``(k, B, C, block)`` float64 (k = 2 hard, 3 soft) and ``slots`` filled in place.

    ``probs`` ``(B, C, N)`` float32/64 and ``codes`` ``(B, N)`` (:func:`label_codes`) on the CPU;
    ``code_term`` the float64 per-code term of the slot position, ``scale`` its factor of ``p``;
    ``block`` slots per row."""
    batch, classes, voxels = probs.shape
    p, c_codes, term, out_slots = probs.detach().contiguous().numpy(), codes.numpy(), code_term.numpy(), slots.numpy()
    kernel = _kernels(soft)[0]
    partial = np.zeros((batch, classes, len(_parts(voxels)), 3 if soft else 2, block), dtype=np.float64)

    def part(row: tuple[int, int], k: int, start: int, stop: int) -> None:
        b, c = row
        kernel(p[b, c], c_codes[b], start, stop, term, scale, out_slots[b, c], partial[b, c, k])

    _each_part([(b, c) for b in range(batch) for c in range(classes)], voxels, part)
    return torch.from_numpy(partial.sum(2)).permute(2, 0, 1, 3)


def gather(probs: Tensor, slots: Tensor, g_sum: Tensor, g_square: Tensor | None, grad: Tensor) -> None:
    """``grad = g_sum[slot] + g_square[slot] * p`` (tables ``(B, C, block)`` in ``probs``' dtype)."""
    batch, classes, voxels = probs.shape
    p, s, out = probs.detach().contiguous().numpy(), slots.numpy(), grad.numpy()
    first = g_sum.contiguous().numpy()
    second = first if g_square is None else g_square.contiguous().numpy()
    kernel = _kernels(g_square is not None)[1]

    def part(row: tuple[int, int], k: int, start: int, stop: int) -> None:
        b, c = row
        kernel(p[b, c], s[b, c], start, stop, first[b, c], second[b, c], out[b, c])

    _each_part([(b, c) for b in range(batch) for c in range(classes)], voxels, part)
