"""Confidence binning and the one-pass histogram kernel behind the calibration metrics (SPEC §3).

Bins: ``b = clamp(ceil(p * M) - 1, 0, M - 1)`` evaluated in float64 (exact for float16/32 inputs,
whose product with ``M`` is exact in float64), i.e. bins ``(b/M, (b+1)/M]`` with ``p = 0`` in the
first bin and ``p = 1`` in the last.

One pass over the voxels of a case fills, per cell (a disjoint piece of the image: the
combination of region memberships) and bin:

- top label: count, sum of confidence ``max_k p_k``, sum of correct (argmax == target, first
  maximum on ties, as ``torch.argmax``);
- class-wise, for every class k: count, sum of ``p_k``, sum of ``[target == k]``;
- per cell: sum of NLL ``-log max(p_y, eps)`` and of Brier ``sum_k (p_k - [y == k])^2``.

Every sum is accumulated in float64 with ``scatter_add_`` over a combined (cell, class, bin)
index -- no Python loop over bins, and per-voxel work only in elementwise ops (the top-label
argmax is a product of signs, so that ties go to the first class without a slow argmax). The
voxels are processed in chunks with preallocated buffers (cache-sized on CPU, where fresh large
temporaries page-fault on every call); on CUDA the chunks are large and the scatters are
``torch.bincount`` histograms (shared-memory atomics rather than contended global ones).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

_SERIAL_ENTRIES = 32767  # below ATen's GRAIN_SIZE an op runs serially, without an OpenMP team
_GPU_CHUNK_ENTRIES = 2**23


def bin_index(p: torch.Tensor, n_bins: int) -> torch.Tensor:
    """SPEC bin index ``clamp(ceil(p * n_bins) - 1, 0, n_bins - 1)`` (int64), computed in float64."""
    return (p.double() * n_bins).ceil_().sub_(1).clamp_(0, n_bins - 1).long()


@dataclass
class Histograms:
    """Per-cell sufficient statistics of one case (float64; ``None`` when not requested).

    Attributes:
        top: ``(n_cells, M, 3)``: count, sum of confidence, sum of correct.
        classwise: ``(n_cells, C, M, 3)``: count, sum of ``p_k``, sum of ``[y == k]``.
        scores: ``(n_cells, 2)``: sum of NLL, sum of Brier.
    """

    top: torch.Tensor | None = None
    classwise: torch.Tensor | None = None
    scores: torch.Tensor | None = None


def _accumulate(acc: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, use_bincount: bool) -> None:
    """``acc[index[i]] += weights[i]`` in float64."""
    if use_bincount:
        acc += torch.bincount(index, weights=weights, minlength=acc.numel())
    else:
        acc.scatter_add_(0, index, weights)


@dataclass(frozen=True)
class _Plan:
    num_classes: int
    n_bins: int
    slots: int
    with_cells: bool
    top: bool
    classwise: bool
    scores: bool
    nll_eps: float
    chunk: int
    use_bincount: bool


def default_chunk_size(device: torch.device, num_classes: int) -> int:
    """Voxels per chunk: on CPU small enough that every op runs serially in cache (the voxel
    ranges are spread over threads instead); on CUDA large."""
    entries = _GPU_CHUNK_ENTRIES if device.type == "cuda" else _SERIAL_ENTRIES
    return max(1, entries // max(num_classes, 1))


_EXECUTORS: dict[int, ThreadPoolExecutor] = {}


def _executor(workers: int) -> ThreadPoolExecutor:
    if workers not in _EXECUTORS:
        _EXECUTORS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="segcalib-hist")
    return _EXECUTORS[workers]


def case_histograms(
    probs: torch.Tensor,
    target: torch.Tensor,
    n_bins: int,
    cells: torch.Tensor | None = None,
    n_cells: int = 1,
    *,
    top: bool = True,
    classwise: bool = True,
    scores: bool = True,
    nll_eps: float = 1e-12,
    chunk_size: int | None = None,
    workers: int | None = None,
    use_bincount: bool | None = None,
) -> Histograms:
    """Sufficient statistics of one case, per cell and bin, in one pass over its voxels.

    Args:
        probs: ``(C, N)`` class probabilities (float16/32/64; rows may be strided views).
        target: int64 ``(N,)`` labels in ``0..C-1``.
        n_bins: number of equal-width bins ``M``.
        cells: integer ``(N,)`` cell of each voxel in ``0..n_cells-1``; the value ``n_cells``
            drops the voxel (ignored voxels). ``None``: every voxel in cell 0.
        n_cells: number of cells.
        top, classwise, scores: which statistics to gather (``scores`` needs ``top``).
        nll_eps: floor on ``p_y`` inside the log of the NLL.
        chunk_size: voxels per chunk (default :func:`default_chunk_size`).
        workers: threads sharing the voxels on CPU (default ``torch.get_num_threads()``).
        use_bincount: histogram with ``torch.bincount`` (default on CUDA) instead of
            ``scatter_add_`` (default on CPU).
    """
    num_classes, n_vox = probs.shape
    device = probs.device
    if cells is None and n_cells != 1:
        raise ValueError("n_cells must be 1 when cells is None")
    if scores and not top:
        raise ValueError("scores need top=True (the voxel counts come from the top-label histogram)")
    chunk = max(1, min(chunk_size or default_chunk_size(device, num_classes), max(n_vox, 1)))
    plan = _Plan(
        num_classes=num_classes,
        n_bins=n_bins,
        slots=n_cells + 1 if cells is not None else 1,  # one extra slot collects dropped voxels
        with_cells=cells is not None,
        top=top,
        classwise=classwise,
        scores=scores,
        nll_eps=nll_eps,
        chunk=chunk,
        use_bincount=device.type == "cuda" if use_bincount is None else use_bincount,
    )
    if workers is None:
        workers = torch.get_num_threads() if device.type == "cpu" else 1
    n_chunks = -(-n_vox // chunk)
    workers = max(1, min(workers, n_chunks))
    bounds = [n_vox * w // workers // chunk * chunk for w in range(workers)] + [n_vox]
    ranges = [(bounds[w], bounds[w + 1]) for w in range(workers) if bounds[w] < bounds[w + 1]]
    if len(ranges) <= 1:
        parts = [_histogram_range(plan, probs, target, cells, 0, n_vox)]
    else:
        parts = list(_executor(len(ranges)).map(lambda r: _histogram_range(plan, probs, target, cells, *r), ranges))
    acc = {k: torch.stack([part[k] for part in parts]).sum(0) for k in parts[0]}

    m, slots = n_bins, plan.slots
    result = Histograms()
    if classwise:
        result.classwise = torch.stack([acc["cls_count"], acc["cls_sum"], acc["cls_pos"]], -1)
        result.classwise = result.classwise.view(slots, num_classes, m, 3)[:n_cells]
    if top:
        pairs = torch.stack([acc["top_count"], acc["top_sum"]], -1).view(slots, m, 2, 2)  # [.., correct, stat]
        count = pairs[..., 0].sum(-1)
        result.top = torch.stack([count, pairs[..., 1].sum(-1), pairs[:, :, 1, 0]], -1)[:n_cells]
    if scores:
        voxels = result.top[..., 0].sum(-1) if result.top is not None else None
        nll = -acc["log_p_true"][:n_cells]
        brier = acc["brier_part"][:n_cells] + voxels  # sum_k p_k^2 - 2 p_y + 1
        result.scores = torch.stack([nll, brier], -1)
    return result


def _histogram_range(
    plan: _Plan,
    probs: torch.Tensor,
    target: torch.Tensor,
    cells: torch.Tensor | None,
    begin: int,
    end: int,
) -> dict[str, torch.Tensor]:
    """Flat float64 accumulators for the voxels ``begin:end`` (runs in a worker thread on CPU)."""
    device = probs.device
    c_n, m, chunk, slots = plan.num_classes, plan.n_bins, plan.chunk, plan.slots
    f64, i64 = torch.float64, torch.int64
    use_bc = plan.use_bincount

    def zeros(size: int) -> torch.Tensor:
        return torch.zeros(size, dtype=f64, device=device)

    def empty(size: int, dtype: torch.dtype = f64) -> torch.Tensor:
        return torch.empty(size, dtype=dtype, device=device)

    acc: dict[str, torch.Tensor] = {}
    # preallocated workspace: fresh large temporaries would page-fault on every chunk on CPU
    ones = torch.ones(c_n * chunk, dtype=f64, device=device)
    positions = torch.arange(chunk, dtype=i64, device=device)
    need_p64 = plan.classwise or plan.scores
    if need_p64:
        p64_buf = empty(c_n * chunk)
        true_flat = empty(chunk, i64)
    if plan.classwise:
        for k in ("cls_count", "cls_sum", "cls_pos"):
            acc[k] = zeros(slots * c_n * m)
        fidx = empty(c_n * chunk)
        idx = empty(c_n * chunk, i64)
        row_offset = (torch.arange(c_n, dtype=f64, device=device) * m).view(c_n, 1)
    if plan.top:
        acc["top_count"], acc["top_sum"] = zeros(slots * m * 2), zeros(slots * m * 2)
        conf = empty(chunk, f64 if need_p64 else probs.dtype)
        signs = empty(max(c_n - 1, 1) * chunk, conf.dtype)
        tidx = empty(chunk)
        tidx_long = empty(chunk, i64)
    if plan.scores:
        acc["log_p_true"], acc["brier_part"] = zeros(slots), zeros(slots)
        squares = empty(c_n * chunk)
        sums = empty(chunk)
    if plan.with_cells:
        cell_f = empty(chunk)
        cell_long = empty(chunk, i64)

    for start in range(begin, end, chunk):
        n = min(chunk, end - start)
        p = probs[:, start : start + n]
        y = target[start : start + n]
        if plan.with_cells:
            zf, zl = cell_f[:n], cell_long[:n]
            zf.copy_(cells[start : start + n])
            zl.copy_(cells[start : start + n])
        if need_p64:
            p64 = p64_buf[: c_n * n].view(c_n, n)
            p64.copy_(p)
            tf = true_flat[:n]
            torch.add(positions[:n], y, alpha=n, out=tf)  # flat index of (y_i, i) in a (C, n) block

        if plan.top:
            # first argmax without argmax: pred = sum_k prod_{j<=k} [p_j < max]; sign(max - p_j) is 0 or 1
            c = conf[:n]
            src = p64 if need_p64 else p
            torch.amax(src, dim=0, out=c)
            pred = torch.sub(c, src[: max(c_n - 1, 1)], out=signs[: max(c_n - 1, 1) * n].view(-1, n))
            pred = pred.sign_().cumprod_(0).sum(0) if c_n > 1 else torch.zeros_like(c)
            correct = torch.eq(pred, y)

        if plan.classwise:
            f = fidx[: c_n * n].view(c_n, n)
            torch.mul(p64, m, out=f)
            f.ceil_().clamp_(1, m)  # bin + 1
            if plan.top:
                ti = torch.amax(f, dim=0, out=tidx[:n])  # bin + 1 of the confidence (bins are monotone)
            f.add_(row_offset)  # bin + 1 + class * M
            if plan.with_cells:
                f.add_(zf, alpha=c_n * m)
            ix = idx[: c_n * n]
            ix.copy_(fidx[: c_n * n]).sub_(1)
            _accumulate(acc["cls_count"], ix, ones[: c_n * n], use_bc)
            _accumulate(acc["cls_sum"], ix, p64_buf[: c_n * n], use_bc)
            _accumulate(acc["cls_pos"], ix.index_select(0, tf), ones[:n], use_bc)
        elif plan.top:
            ti = tidx[:n]
            ti.copy_(c)
            ti.mul_(m).ceil_().clamp_(1, m)

        if plan.top:
            if plan.with_cells:
                ti.add_(zf, alpha=m)
            ti.mul_(2).add_(correct).sub_(2)  # 2 * (cell * M + bin) + correct
            til = tidx_long[:n]
            til.copy_(ti)
            _accumulate(acc["top_count"], til, ones[:n], use_bc)
            _accumulate(acc["top_sum"], til, c if c.dtype == f64 else c.double(), use_bc)

        if plan.scores:
            p_true = p64_buf[: c_n * n].index_select(0, tf)
            sq = squares[: c_n * n].view(c_n, n)
            torch.mul(p64, p64, out=sq)
            brier_part = torch.sum(sq, dim=0, out=sums[:n]).sub_(p_true, alpha=2.0)
            log_p = p_true.clamp_(min=plan.nll_eps).log_()
            if plan.with_cells:
                _accumulate(acc["log_p_true"], zl, log_p, use_bc)
                _accumulate(acc["brier_part"], zl, brier_part, use_bc)
            else:
                acc["log_p_true"] += log_p.sum()
                acc["brier_part"] += brier_part.sum()
    return acc
