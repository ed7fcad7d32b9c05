"""The tuned CPU kernel of the calibration histograms: the same statistics as
:func:`segcalib.metrics.binning.case_histograms`, about twice as fast on CPU (measured in
``benchmarks/bench_metrics.py``).

What makes it faster than the reference's handful of ``bincount`` passes:

- the top-label argmax is a product of signs (``sign(max - p_k)`` is 0 or 1), so ties go to the
  first class without the slow ``argmax`` over a strided dimension; the index carries
  ``label - prediction`` and the count and the confidence share one complex128 scatter;
- each histogram has ``_LANES`` interleaved copies: images put long runs of voxels in one bin,
  and a single histogram would make every add wait for the previous add to that address;
- the voxels go in chunks through reused buffers (a few MiB; fresh large CPU temporaries
  page-fault on every call).

It runs in the calling thread and never changes torch's settings (thread counts included).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache

import torch

from segcalib.metrics.binning import HistogramRequest, Histograms

_LANES = 8  # interleaved copies of each CPU histogram
_CPU_CHUNK_ENTRIES = 2**17  # (class, voxel) entries per chunk: float64 buffers of 1 MiB (L2-sized)


def _accumulate(acc: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, use_bincount: bool) -> None:
    """``acc[index[i]] += weights[i]`` in float64 (or complex128); an empty ``weights`` means ones."""
    if use_bincount:
        if weights.is_complex():
            real = torch.bincount(index, weights=weights.real.contiguous(), minlength=acc.numel())
            imag = torch.bincount(index, weights=weights.imag.contiguous(), minlength=acc.numel())
            acc += torch.complex(real, imag)
        elif weights.numel() == 0:
            acc += torch.bincount(index, minlength=acc.numel())
        else:
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
    validate: bool


def tuned_case_histograms(
    probs: torch.Tensor,
    target: torch.Tensor,
    n_bins: int,
    cells: torch.Tensor | None = None,
    n_cells: int = 1,
    request: HistogramRequest = HistogramRequest(),
    use_bincount: bool = False,
) -> Histograms:
    """:func:`~segcalib.metrics.binning.case_histograms` on CPU: the same arguments (its keyword
    arguments in ``request``; ``validate`` checks chunk by chunk before use; the default chunk
    fills buffers of about 1 MiB, cache-resident) and the same result.

    ``use_bincount``: histogram with ``torch.bincount`` instead of ``scatter_add_`` (tests check
    that both give the same sums).
    """
    top, classwise, scores = request.top, request.classwise, request.scores
    num_classes, n_vox = probs.shape
    chunk = max(1, request.chunk_size or _CPU_CHUNK_ENTRIES // max(num_classes, 1))
    plan = _Plan(
        num_classes=num_classes,
        n_bins=n_bins,
        slots=n_cells + 1 if cells is not None else 1,  # one extra slot collects dropped voxels
        with_cells=cells is not None,
        top=top,
        classwise=classwise,
        scores=scores,
        nll_eps=request.nll_eps,
        chunk=chunk,
        use_bincount=use_bincount,
        validate=request.validate,
    )
    acc = _histogram_range(plan, probs, target, cells, 0, n_vox)

    m, slots = n_bins, plan.slots
    result = Histograms()
    if classwise:
        result.classwise = torch.stack([acc["cls_count"], acc["cls_sum"], acc["cls_pos"]], -1)
        result.classwise = result.classwise.view(slots, num_classes, m, 3)[:n_cells]
    if top:
        # complex: real = count, imaginary = sum of confidence, per (cell, bin, label - prediction)
        top_acc = acc["top"].view(slots, m, 2 * num_classes - 1)
        count = top_acc.real.sum(-1)
        correct = top_acc.real[..., num_classes - 1]
        result.top = torch.stack([count, top_acc.imag.sum(-1), correct], -1)[:n_cells]
    if scores:
        voxels = result.top[..., 0].sum(-1) if result.top is not None else None
        nll = -acc["log_p_true"][:n_cells]
        brier = acc["brier_part"][:n_cells] + voxels  # sum_k p_k^2 - 2 p_y + 1
        result.scores = torch.stack([nll, brier], -1)
    return result


def _check_ranges(p: torch.Tensor, y_float: torch.Tensor, num_classes: int, p_max: torch.Tensor | None) -> None:
    """Raise ValueError unless ``0 <= y < C`` and ``0 <= p <= 1`` (NaN fails); one host sync.

    ``y_float`` holds the labels as floats (int64 reductions are not vectorised on CPU; labels
    too large for float32 still compare as out of range); ``p_max`` is the per-voxel maximum
    when already known.
    """
    hi = (p_max if p_max is not None else p).amax()
    values = torch.stack([y_float.amin().double(), y_float.amax().double(), p.amin().double(), hi.double()]).tolist()
    if not (values[0] >= 0 and values[1] < num_classes):
        raise ValueError(
            f"target labels must lie in 0..{num_classes - 1} (or equal ignore_index), "
            f"got values in [{int(values[0])}, {int(values[1])}]"
        )
    if not (values[2] >= 0.0 and values[3] <= 1.0):
        raise ValueError(f"probs must lie in [0, 1], got values in [{values[2]}, {values[3]}]")


def _constants(device: torch.device, c_n: int, m: int, chunk: int, slots: int, lanes: int) -> dict[str, torch.Tensor]:
    """Read-only index offsets (and ones on CPU); cached on CPU, rebuilt on GPU (no memory kept)."""
    if device.type == "cpu":
        return _cpu_constants(c_n, m, chunk, slots, lanes)
    return _build_constants(device, c_n, m, chunk, slots, lanes)


@lru_cache(maxsize=16)
def _cpu_constants(c_n: int, m: int, chunk: int, slots: int, lanes: int) -> dict[str, torch.Tensor]:
    return _build_constants(torch.device("cpu"), c_n, m, chunk, slots, lanes)


def _build_constants(
    device: torch.device, c_n: int, m: int, chunk: int, slots: int, lanes: int
) -> dict[str, torch.Tensor]:
    positions = torch.arange(chunk, dtype=torch.int64, device=device)
    lane = (positions % lanes).to(torch.float64) if lanes > 1 else torch.zeros(1, dtype=torch.float64, device=device)
    k_cls, k_top = slots * c_n * m, slots * m * (2 * c_n - 1)
    rows = torch.arange(c_n, dtype=torch.float64, device=device).view(c_n, 1)
    return {
        "ones": torch.ones(c_n * chunk if device.type == "cpu" else 0, dtype=torch.float64, device=device),
        "positions": positions,
        # class-wise index = bin + class * M + lane * K, where bin + 1 = ceil(p M) clamped to [1, M]
        "cls_offset": rows * m - 1 + lane * k_cls,
        # top-label index = (2C - 1) * (cell * M + bin) + (label - prediction + C - 1) + lane * K,
        # computed from bin + 1
        "top_offset": lane * k_top - (2 * c_n - 1) + (c_n - 1),
        "score_lane": (positions % lanes) * slots if lanes > 1 else torch.zeros(1, dtype=torch.int64, device=device),
    }


_SCRATCH = threading.local()


def _scratch(name: str, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread reusable CPU buffer (fresh large CPU allocations page-fault on first touch);
    on other devices a new tensor from the caching allocator."""
    if device.type != "cpu":
        return torch.empty(size, dtype=dtype, device=device)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buf = buffers.get(name)
    if buf is None or buf.dtype != dtype or buf.numel() < size:
        buf = buffers[name] = torch.empty(size, dtype=dtype)
    return buf[:size]


def _histogram_range(
    plan: _Plan,
    probs: torch.Tensor,
    target: torch.Tensor,
    cells: torch.Tensor | None,
    begin: int,
    end: int,
) -> dict[str, torch.Tensor]:
    """Flat float64 accumulators for the voxels ``begin:end``.

    On CPU each histogram has ``_LANES`` copies and consecutive voxels go to different copies:
    real images put long runs of voxels in the same bin, and a single histogram would make every
    add wait for the previous one to the same address.
    """
    device = probs.device
    c_n, m, chunk, slots = plan.num_classes, plan.n_bins, plan.chunk, plan.slots
    f64, i64 = torch.float64, torch.int64
    use_bc = plan.use_bincount
    lanes = 1 if use_bc else _LANES
    k_cls, k_top = slots * c_n * m, slots * m * (2 * c_n - 1)

    def zeros(size: int) -> torch.Tensor:
        return torch.zeros(size, dtype=f64, device=device)

    def empty(name: str, size: int, dtype: torch.dtype = f64) -> torch.Tensor:
        return _scratch(name, size, dtype, device)

    const = _constants(device, c_n, m, chunk, slots, lanes)
    acc: dict[str, torch.Tensor] = {}
    ones, positions = const["ones"], const["positions"]
    # float16/bfloat16 inputs go through float64 (their sums of labels could round in half precision)
    need_p64 = plan.classwise or plan.scores or probs.dtype not in (torch.float32, torch.float64)
    if need_p64:
        p64_buf = empty("p64", c_n * chunk)
        work = empty("work", c_n * chunk)
        true_flat = empty("true_flat", chunk, i64)
    if plan.classwise:
        for k in ("cls_count", "cls_sum", "cls_pos"):
            acc[k] = zeros(lanes * k_cls)
        idx = empty("idx", c_n * chunk, i64)
        cls_offset = const["cls_offset"]
    if plan.top:
        acc["top"] = torch.zeros(lanes * k_top, dtype=torch.complex128, device=device)
        conf = empty("conf", chunk, f64 if need_p64 else probs.dtype)
        # (1, confidence) pairs viewed as complex: one scatter adds the count and the confidence
        pairs = empty("top_pairs", 2 * chunk).view(chunk, 2)
        pairs[:, 0] = 1.0
        pair_src = torch.view_as_complex(pairs)
        signs = empty("signs", max(c_n - 1, 1) * chunk, conf.dtype)
        tidx = empty("tidx", chunk)
        tidx_long = empty("tidx_long", chunk, i64)
        top_offset = const["top_offset"]
    if plan.scores:
        acc["log_p_true"], acc["brier_part"] = zeros(lanes * slots), zeros(lanes * slots)
        sums = empty("sums", chunk)
    if plan.top or plan.validate:
        label_f = empty("label_f", chunk, conf.dtype if plan.top else torch.float32)
    if plan.with_cells:
        cell_f = empty("cell_f", chunk)
        cell_long = empty("cell_long", chunk, i64)
        score_lane = const["score_lane"]

    for start in range(begin, end, chunk):
        n = min(chunk, end - start)
        p = probs[:, start : start + n]
        y = target[start : start + n]
        if plan.top or plan.validate:
            yf = label_f[:n]
            yf.copy_(y)
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
            if plan.validate:
                _check_ranges(p, yf, c_n, c)
            if c_n > 1:
                sg = torch.sub(c, src[: c_n - 1], out=signs[: (c_n - 1) * n].view(c_n - 1, n)).sign_()
                for k in range(1, c_n - 1):
                    sg[k].mul_(sg[k - 1])
                gap = yf.sub_(sg.sum(0))  # label - prediction, 0 when correct
            else:
                gap = yf.zero_()
        elif plan.validate:
            _check_ranges(p, yf, c_n, None)

        if plan.classwise:
            f = work[: c_n * n].view(c_n, n)
            torch.mul(p64, m, out=f)
            f.ceil_().clamp_(1, m)  # bin + 1
            if plan.top:
                ti = torch.amax(f, dim=0, out=tidx[:n])  # bin + 1 of the confidence (bins are monotone)
            f.add_(cls_offset[:, :n])
            if plan.with_cells:
                f.add_(zf, alpha=c_n * m)
            ix = idx[: c_n * n]
            ix.copy_(work[: c_n * n])
            _accumulate(acc["cls_count"], ix, ones[: c_n * n], use_bc)  # ones is empty on GPU: counts
            _accumulate(acc["cls_sum"], ix, p64_buf[: c_n * n], use_bc)
            _accumulate(acc["cls_pos"], ix.index_select(0, tf), ones[:n], use_bc)
        elif plan.top:
            ti = tidx[:n]
            ti.copy_(c)
            ti.mul_(m).ceil_().clamp_(1, m)

        if plan.top:
            if plan.with_cells:
                ti.add_(zf, alpha=m)
            torch.add(top_offset[:n], ti, alpha=2 * c_n - 1, out=ti).add_(gap)
            til = tidx_long[:n]
            til.copy_(ti)
            pairs[:n, 1].copy_(c)
            _accumulate(acc["top"], til, pair_src[:n], use_bc)

        if plan.scores:
            p_true = p64_buf[: c_n * n].index_select(0, tf)
            sq = work[: c_n * n].view(c_n, n)
            torch.mul(p64, p64, out=sq)
            brier_part = torch.sum(sq, dim=0, out=sums[:n]).sub_(p_true, alpha=2.0)
            log_p = p_true.clamp_(min=plan.nll_eps).log_()
            if plan.with_cells:
                zl.add_(score_lane[:n])
                _accumulate(acc["log_p_true"], zl, log_p, use_bc)
                _accumulate(acc["brier_part"], zl, brier_part, use_bc)
            else:
                acc["log_p_true"][0] += log_p.sum()
                acc["brier_part"][0] += brier_part.sum()
    return {k: v.view(lanes, -1).sum(0) for k, v in acc.items()}
