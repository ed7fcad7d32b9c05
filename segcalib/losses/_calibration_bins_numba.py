"""CPU kernels for :mod:`segcalib.losses._calibration_bins`, compiled with numba when it is installed.

The torch path of the cell moments needs about ten ATen calls per chunk of voxels and class (a
float64 position, its truncation, two or three ``bincount``), all on one core. These kernels do
the same arithmetic in one loop per (image, class) row, cut into parts of a fixed size, and run the
(row, part) jobs of a call in one compiled launch with ``numba.prange`` on ``torch.get_num_threads()``
threads. numba's ``omp`` threading layer is asked for first: it is the OpenMP runtime torch has
loaded, so the jobs run on torch's own intra-op threads instead of competing with them (see
:data:`_PARALLEL_LAYERS`); on any other layer the jobs run on the calling thread. Same float64
position, same truncation, so the same slot for every voxel; the sums differ from the torch path's
only in the order of addition, and are the same bits with any thread count. The backward from
logits gathers the bin gradients and applies the softmax's backward in the same pass.

numba is the optional ``fast-cpu`` extra; without it (or with ``SEGCALIB_NUMBA=0``) the torch path
runs. The kernels are compiled on first use in each process (a second or two), never cached to
disk.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
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
_TILE = 512
"""Voxels per tile of the logits' gather: its ``(C, tile)`` gradient stays in the L1 cache between
the two passes over the classes."""


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
def _kernels(soft: bool) -> tuple[Callable[..., None], Callable[..., None], Callable[..., None]]:
    """The moments, gather and logits' gather kernels, ``soft`` frozen in (numba treats a closure's variables as
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

    @numba.njit(nogil=True, boundscheck=False, cache=False)
    def logits_gather_kernel(p, slots, start, stop, g_sum, g_square, grad):  # pragma: no cover - compiled
        """The logits' gradient on voxels ``[start, stop)`` of one image (``p``, ``slots``, ``grad``
        ``(C, N)``): ``g_c = g_sum[c, slot] (+ g_square[c, slot] p_c, soft)``, then
        ``grad_c = (g_c - sum_k p_k g_k) p_c`` (the softmax's backward), a tile of voxels at a time
        so that ``g`` never leaves the cache."""
        classes = p.shape[0]
        tile = _TILE
        dot = np.empty(tile, dtype=grad.dtype)
        for first in range(start, stop, tile):
            n = min(tile, stop - first)
            dot[:n] = 0.0
            for c in range(classes):
                pc, sc, gc, table = p[c, first:first + n], slots[c, first:first + n], grad[c, first:first + n], g_sum[c]
                for i in range(n):
                    value = table[sc[i]]
                    if soft:
                        value += g_square[c, sc[i]] * pc[i]
                    gc[i] = value
                    dot[i] += value * pc[i]
            for c in range(classes):
                pc, gc = p[c, first:first + n], grad[c, first:first + n]
                for i in range(n):
                    gc[i] = (gc[i] - dot[i]) * pc[i]

    return moments_kernel, gather_kernel, logits_gather_kernel


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


@functools.cache
def _drivers(soft: bool, parallel: bool) -> dict[str, Callable[..., None]]:
    """Every (row, part) job of one call in one compiled launch: ``parallel`` with ``numba.prange``
    (on numba's threading layer, which is torch's own OpenMP runtime when numba picks ``omp``: see
    :func:`_parallel`), else one loop on the calling thread."""
    numba = _numba()
    moments_kernel, gather_kernel, logits_gather_kernel = _kernels(soft)
    codes_kernel = _codes_kernel()
    loop = numba.prange if parallel else range
    jit = numba.njit(nogil=True, boundscheck=False, cache=False, parallel=parallel)

    @numba.njit(inline="always")
    def _split(index, size):  # pragma: no cover - compiled
        """``divmod`` in int64 (a prange index is unsigned, and numba's mixed-sign divmod is float)."""
        i, n = np.int64(index), np.int64(size)
        return i // n, i - (i // n) * n

    @jit
    def moments_all(p, codes, starts, stops, term, scale, slots, partial):  # pragma: no cover - compiled
        classes, parts = p.shape[1], starts.shape[0]
        for job in loop(p.shape[0] * classes * parts):
            row, k = _split(job, parts)
            b, c = _split(row, classes)
            moments_kernel(p[b, c], codes[b], starts[k], stops[k], term, scale, slots[b, c], partial[b, c, k])

    @jit
    def gather_all(p, slots, starts, stops, first, second, grad):  # pragma: no cover - compiled
        classes, parts = p.shape[1], starts.shape[0]
        for job in loop(p.shape[0] * classes * parts):
            row, k = _split(job, parts)
            b, c = _split(row, classes)
            gather_kernel(p[b, c], slots[b, c], starts[k], stops[k], first[b, c], second[b, c], grad[b, c])

    @jit
    def logits_gather_all(p, slots, starts, stops, first, second, grad):  # pragma: no cover - compiled
        parts = starts.shape[0]
        for job in loop(p.shape[0] * parts):
            b, k = _split(job, parts)
            logits_gather_kernel(p[b], slots[b], starts[k], stops[k], first[b], second[b], grad[b])

    @jit
    def codes_all(target, starts, stops, ignore_index, classes, codes, bad):  # pragma: no cover - compiled
        parts = starts.shape[0]
        for job in loop(target.shape[0] * parts):
            b, k = _split(job, parts)
            bad[b, k] = codes_kernel(target[b], starts[k], stops[k], ignore_index, classes, codes[b])

    return {"moments": moments_all, "gather": gather_all, "logits_gather": logits_gather_all, "codes": codes_all}


_PARALLEL_LAYERS = ("omp", "tbb")
"""numba threading layers the kernels run in parallel on: ``omp`` is the OpenMP runtime torch has
loaded (the same ``libgomp.so.1``), so the kernels run on torch's own intra-op threads, which are
still spinning from the op before (a pool of other threads would wait for a core while they spin:
the moments took twice as long right after a torch op). ``workqueue`` is neither safe for
launches from several threads at once nor shared with torch: the kernels run on one thread then."""


@functools.cache
def _parallel() -> bool:
    """Whether numba runs parallel launches on a layer of :data:`_PARALLEL_LAYERS`. Unless the user
    chose a layer (``NUMBA_THREADING_LAYER`` or its priority), ``omp`` is tried first; the layer is
    fixed by numba's first parallel launch in the process, made here on a tiny input."""
    numba = _numba()
    user_choice = {"NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY"} & set(os.environ)
    if not user_choice and numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
    try:
        codes = torch.empty(1, 1, dtype=torch.uint8).numpy()
        bounds = np.zeros(1, dtype=np.int64)
        _drivers(False, True)["codes"](np.zeros((1, 1), dtype=np.int64), bounds, bounds + 1, -100, 1, codes,
                                       np.zeros((1, 1), dtype=np.int64))
        layer = numba.threading_layer()
    except Exception as exc:  # no layer loads: numba raises ValueError, a broken library anything
        log.warning("numba has no threading layer (%s); the L1-ACE kernels run on one thread", exc)
        return False
    if layer not in _PARALLEL_LAYERS:
        log.info("numba's threading layer is %s; the L1-ACE kernels run on one thread", layer)
        return False
    return True


def _launch(name: str, soft: bool, *args: Any) -> None:
    """Run driver ``name`` on ``torch.get_num_threads()`` threads (one: on the calling thread, with no
    threading layer involved, as in a forked child, where the parent's OpenMP threads do not exist)."""
    threads = torch.get_num_threads()
    if threads > 1 and _parallel():
        numba = _numba()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        _drivers(soft, True)[name](*args)
    else:
        _drivers(soft, False)[name](*args)


def _parts(voxels: int) -> tuple[np.ndarray, np.ndarray]:
    """Starts and stops of the ``[start, stop)`` parts of a row of ``voxels``, ``MIN_PART`` voxels or
    more each. The split depends on the row's length only, never on the thread count, so the sums
    are the same bits with any number of threads."""
    count = max(1, min(MAX_PARTS, voxels // MIN_PART))
    step = -(-voxels // count)
    starts = np.arange(0, voxels, step, dtype=np.int64)
    return starts, np.minimum(starts + step, voxels)


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
    starts, stops = _parts(voxels)
    bad = np.zeros((batch, len(starts)), dtype=np.int64)
    _launch("codes", False, target.contiguous().numpy(), starts, stops, ignore_index, classes, codes.numpy(), bad)
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
    starts, stops = _parts(voxels)
    partial = np.zeros((batch, classes, len(starts), 3 if soft else 2, block), dtype=np.float64)
    _launch("moments", soft, probs.detach().contiguous().numpy(), codes.numpy(), starts, stops, code_term.numpy(),
            scale, slots.numpy(), partial)
    return torch.from_numpy(partial.sum(2)).permute(2, 0, 1, 3)


def gather(probs: Tensor, slots: Tensor, g_sum: Tensor, g_square: Tensor | None, grad: Tensor) -> None:
    """``grad = g_sum[slot] + g_square[slot] * p`` (tables ``(B, C, block)`` in ``probs``' dtype)."""
    _gather("gather", probs, slots, g_sum, g_square, grad)


def gather_logits(probs: Tensor, slots: Tensor, g_sum: Tensor, g_square: Tensor | None, grad: Tensor) -> None:
    """The logits' gradient when ``probs`` is their softmax: :func:`gather`, then the softmax's
    backward ``(g - sum_c p g) p``, in one pass (no ``(B, C, N)`` intermediate; each voxel's
    classes summed in class order, so the same bits with any thread count)."""
    _gather("logits_gather", probs, slots, g_sum, g_square, grad)


def _gather(driver: str, probs: Tensor, slots: Tensor, g_sum: Tensor, g_square: Tensor | None, grad: Tensor) -> None:
    """Launch a gather ``driver`` (soft when ``g_square`` is given; hard kernels never read it)."""
    first = g_sum.contiguous().numpy()
    second = first if g_square is None else g_square.contiguous().numpy()
    starts, stops = _parts(probs.shape[-1])
    _launch(driver, g_square is not None, probs.detach().contiguous().numpy(), slots.numpy(), starts, stops,
            first, second, grad.numpy())
