"""Confidence binning and the one-pass histogram behind the calibration metrics (SPEC §3).

Bins: ``b = clamp(ceil(p * M) - 1, 0, M - 1)`` evaluated in float64 (exact for float16/32 inputs,
whose product with ``M`` is exact in float64), i.e. bins ``(b/M, (b+1)/M]`` with ``p = 0`` in the
first bin and ``p = 1`` in the last.

One pass over the voxels of a batch fills, per case, cell (a disjoint piece of the image: the
combination of region memberships, see :func:`segcalib.spatial.regions.region_cells`) and bin:

- top label: count, sum of confidence ``max_k p_k``, sum of correct (argmax == target, first
  maximum on ties, as ``torch.max``);
- class-wise, for every class k: count, sum of ``p_k``, sum of ``[target == k]``;
- per cell: sum of NLL ``-log max(p_y, eps)`` and of Brier ``sum_k (p_k - [y == k])^2``.

Every statistic of a voxel lands at one combined index ``(case * slots + cell) * ... + bin``, so
all regions, classes and cases are one histogram. Three interchangeable backends compute it:

- ``"torch"`` (this module): a fixed number of tensor ops per chunk of voxels, ``index_add_``
  into float64 accumulators -- no host synchronisation (no ``bincount``, no ``.item()``), so a
  CUDA stream never waits; the reference for the other two;
- ``"cpu"``: the tuned CPU kernel of :mod:`segcalib.metrics.binning_cpu` (faster on CPU);
- ``"triton"``: the fused GPU kernel of :mod:`segcalib.metrics.binning_triton` (one read of the
  probabilities, block-local histograms, one atomic add per block and bin).

With ``validate`` the value ranges are checked before any voxel is added: one host sync per call.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

_CHUNK_ENTRIES = {"cpu": 2**21, "cuda": 2**26}  # (case, class, voxel) entries per chunk: 256³x4 is one on CUDA
BACKENDS = ("torch", "cpu", "triton")
_TRITON_FAILED: list[str] = []  # why the default Triton kernel failed in this process, if it did


def bin_index(p: torch.Tensor, n_bins: int) -> torch.Tensor:
    """SPEC bin index ``clamp(ceil(p * n_bins) - 1, 0, n_bins - 1)`` (int64), computed in float64."""
    return (p.double() * n_bins).ceil_().sub_(1).clamp_(0, n_bins - 1).long()


@dataclass(frozen=True)
class HistogramRequest:
    """Which statistics the histogram kernels gather and how (their keyword arguments)."""

    top: bool = True
    classwise: bool = True
    scores: bool = True
    nll_eps: float = 1e-12
    validate: bool = False
    chunk_size: int | None = None


@dataclass
class Histograms:
    """Per-cell sufficient statistics (float64; ``None`` when not requested); the arrays below
    carry a leading case axis ``(B, ...)`` when they come from :func:`batch_histograms`.

    Attributes:
        top: ``(n_cells, M, 3)``: count, sum of confidence, sum of correct.
        classwise: ``(n_cells, C, M, 3)``: count, sum of ``p_k``, sum of ``[y == k]``.
        scores: ``(n_cells, 2)``: sum of NLL, sum of Brier.
    """

    top: torch.Tensor | None = None
    classwise: torch.Tensor | None = None
    scores: torch.Tensor | None = None


def default_backend(device: torch.device) -> str:
    """The backend :func:`batch_histograms` uses on ``device``: the tuned kernel on CPU, the Triton
    kernel on CUDA when Triton imports (until it fails once: then a warning, and the torch ops for
    the rest of the process), the torch ops elsewhere."""
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and not _TRITON_FAILED:
        from segcalib.metrics.binning_triton import triton_available

        if triton_available():
            return "triton"
    return "torch"


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
    validate: bool = False,
    chunk_size: int | None = None,
    tuned: bool | None = None,
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
        validate: check that the labels lie in ``0..C-1`` and the probabilities in ``[0, 1]``
            (ValueError otherwise).
        chunk_size: voxels per chunk (bounds the temporary memory).
        tuned: the tuned CPU kernel (``True``) or the torch ops (``False``); default: the
            device's :func:`default_backend`.
    """
    request = HistogramRequest(top, classwise, scores, nll_eps, validate, chunk_size)
    backend = None if tuned is None else ("cpu" if tuned else "torch")
    hist = batch_histograms(
        probs.unsqueeze(0), target.unsqueeze(0), n_bins, None if cells is None else cells.unsqueeze(0), n_cells,
        request, backend,
    )
    return Histograms(*(None if t is None else t[0] for t in (hist.top, hist.classwise, hist.scores)))


def batch_histograms(
    probs: torch.Tensor,
    target: torch.Tensor,
    n_bins: int,
    cells: torch.Tensor | None = None,
    n_cells: int = 1,
    request: HistogramRequest = HistogramRequest(),
    backend: str | None = None,
) -> Histograms:
    """Sufficient statistics of every case of a batch, per cell and bin, in one pass.

    Args:
        probs: ``(B, C, N)`` probabilities; target: int64 ``(B, N)``; cells: integer ``(B, N)``
            or ``None`` (see :func:`case_histograms`, which this extends with the case axis).
        request: which statistics, eps, validation and chunk size.
        backend: one of :data:`BACKENDS` (default: :func:`default_backend` of the device; a default
            Triton kernel leaves histograms too large for its blocks to the torch ops, and falls
            back to them when it fails).

    Returns:
        :class:`Histograms` with a leading case axis: top ``(B, n_cells, M, 3)``, classwise
        ``(B, n_cells, C, M, 3)``, scores ``(B, n_cells, 2)``.
    """
    if cells is None and n_cells != 1:
        raise ValueError("n_cells must be 1 when cells is None")
    if request.scores and not request.top:
        raise ValueError("scores need top=True (the voxel counts come from the top-label histogram)")
    chosen = backend is not None
    backend = backend or default_backend(probs.device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown histogram backend {backend!r}; available: {list(BACKENDS)}")
    if backend == "cpu" and probs.shape[0] > 0:
        from segcalib.metrics.binning_cpu import tuned_case_histograms

        cases = [
            tuned_case_histograms(probs[b], target[b], n_bins, None if cells is None else cells[b], n_cells, request)
            for b in range(probs.shape[0])
        ]
        return Histograms(
            *(torch.stack([getattr(h, k) for h in cases]) if getattr(request, k) else None
              for k in ("top", "classwise", "scores"))
        )
    if request.validate:
        check_ranges(probs, target, probs.shape[1])
    if backend == "triton":
        from segcalib.metrics.binning_triton import triton_histograms, triton_supports

        if not chosen and not triton_supports(n_bins, n_cells):
            return _torch_histograms(probs, target, n_bins, cells, n_cells, request)
        if chosen:
            return triton_histograms(probs, target, n_bins, cells, n_cells, request)
        try:
            return triton_histograms(probs, target, n_bins, cells, n_cells, request)
        except Exception as err:  # noqa: BLE001 - e.g. no C compiler for Triton's launcher
            _TRITON_FAILED.append(repr(err))
            warnings.warn(f"the Triton histogram kernel failed ({err!r}); using torch ops from now on", stacklevel=2)
    return _torch_histograms(probs, target, n_bins, cells, n_cells, request)


def _torch_histograms(
    probs: torch.Tensor,
    target: torch.Tensor,
    n_bins: int,
    cells: torch.Tensor | None,
    n_cells: int,
    request: HistogramRequest,
) -> Histograms:
    """The ``"torch"`` backend: per chunk of voxels (all cases at once) a fixed number of ops."""
    batch, num_classes, n_vox = probs.shape
    m, slots, f64, device = n_bins, n_cells + 1, torch.float64, probs.device  # one extra slot: dropped voxels
    entries = _CHUNK_ENTRIES.get(device.type, 2**25)
    chunk = max(1, request.chunk_size or entries // max(batch * num_classes, 1))
    top_acc = torch.zeros(batch * slots * m, 3, dtype=f64, device=device)
    cls_acc = torch.zeros(batch * slots * num_classes * m, 3, dtype=f64, device=device)
    score_acc = torch.zeros(batch * slots, 2, dtype=f64, device=device)
    case_slot = torch.arange(batch, device=device).view(batch, 1) * slots
    classes = torch.arange(num_classes, device=device).view(1, num_classes, 1)
    for start in range(0, n_vox, chunk):
        p = probs[:, :, start : start + chunk].to(f64)  # (B, C, n)
        y = target[:, start : start + chunk].long()
        slot = case_slot if cells is None else case_slot + cells[:, start : start + chunk].long()  # (B, n)
        confidence, prediction = p.max(1)
        if request.top:
            index = (slot * m + bin_index(confidence, m)).reshape(-1)
            values = torch.stack([torch.ones_like(confidence), confidence, (prediction == y).to(f64)], -1)
            top_acc.index_add_(0, index, values.view(-1, 3))
        if request.classwise:
            index = ((slot.unsqueeze(1) * num_classes + classes) * m + bin_index(p, m)).reshape(-1)
            values = torch.stack([torch.ones_like(p), p, (classes == y.unsqueeze(1)).to(f64)], -1)
            cls_acc.index_add_(0, index, values.view(-1, 3))
        if request.scores:
            p_true = p.gather(1, y.unsqueeze(1)).squeeze(1)
            nll = p_true.clamp(min=request.nll_eps).log().neg_()
            brier = (p * p).sum(1).sub_(p_true, alpha=2.0).add_(1.0)
            score_acc.index_add_(0, slot.expand_as(nll).reshape(-1), torch.stack([nll, brier], -1).view(-1, 2))
    return accumulated_histograms(top_acc, cls_acc, score_acc, (batch, slots, num_classes, m), n_cells, request)


def accumulated_histograms(
    top_acc: torch.Tensor, cls_acc: torch.Tensor, score_acc: torch.Tensor, shape: tuple[int, int, int, int],
    n_cells: int, request: HistogramRequest,
) -> Histograms:
    """The requested statistics out of flat ``(entries, 3|2)`` accumulators over ``shape`` = (cases,
    slots, classes, bins), the last slot (dropped voxels) cut off."""
    batch, slots, num_classes, m = shape
    result = Histograms()
    if request.top:
        result.top = top_acc.view(batch, slots, m, 3)[:, :n_cells]
    if request.classwise:
        result.classwise = cls_acc.view(batch, slots, num_classes, m, 3)[:, :n_cells]
    if request.scores:
        result.scores = score_acc.view(batch, slots, 2)[:, :n_cells]
    return result


def check_ranges(probs: torch.Tensor, target: torch.Tensor, num_classes: int) -> None:
    """ValueError unless ``0 <= y < C`` and ``0 <= p <= 1`` (NaN fails) over the whole batch, before
    any index is formed from them (an out-of-range index would be a device-side assert on CUDA);
    one host sync."""
    if target.numel() == 0:
        return
    y_low, y_high = torch.aminmax(target)
    p_low, p_high = torch.aminmax(probs)
    y_low, y_high, p_low, p_high = torch.stack([y_low.double(), y_high.double(), p_low.double(), p_high.double()]).tolist()
    if not (y_low >= 0 and y_high < num_classes):
        raise ValueError(
            f"target labels must lie in 0..{num_classes - 1} (or equal ignore_index), "
            f"got values in [{int(y_low)}, {int(y_high)}]"
        )
    if not (p_low >= 0.0 and p_high <= 1.0):
        raise ValueError(f"probs must lie in [0, 1], got values in [{p_low}, {p_high}]")
