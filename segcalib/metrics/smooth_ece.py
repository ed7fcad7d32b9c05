"""Smooth ECE (Błasiok & Nakkiran, "Smooth ECE: Principled Reliability Diagrams via Kernel
Smoothing", ICLR 2024), computed as the authors' package ``relplot`` (1.0.3, ``relplot.smECE``)
computes it, in float64 torch.

For scores ``f`` (top-label confidence, or ``p_k`` per class) and outcomes ``y``, the residuals
``f - y`` and the unit weights are smoothed with a Gaussian kernel of bandwidth ``sigma`` reflected
at 0 and 1; ``smECE_sigma = sum_t |r_sigma(t)| dens(t) / sum_t dens(t)`` on an evaluation mesh. The
bandwidth is the fixed point ``sigma* = smECE_sigma*`` found by relplot's bisection (10 halvings
from 1, floor ``eps`` = 0.001). relplot's discretisation is followed step by step: samples are
rounded linearly onto a grid of ``G = max(2000, round(20/sigma)) // 2 + 1`` nodes, the kernel is
sampled on the same grid, the density gets ``+1e-4`` and the mesh has ``max(round(10/sigma), 200)``
points -- so the value matches relplot to rounding (about 1e-12), not only the continuous definition.

Bounded form (streaming, :class:`SmoothECE`): the samples are first rounded linearly onto a fixed
fine grid of ``L + 1`` nodes (``L`` = 64000 by default; state = two float64 grids per row), and the
nodes then act as weighted samples. When ``G - 1`` divides ``L`` -- every bandwidth
``sigma >= 0.01`` (``G - 1 = 1000``) -- rounding fine nodes onto relplot's grid gives exactly
relplot's weights, so the bounded value equals the exact one up to float rounding. For smaller
bandwidths a sample's weight may land up to ``1/L`` away from where relplot puts it (a relative
perturbation of about ``1 / (L sigma)`` <= 1.6 % of one sample's kernel at ``sigma = 0.001``);
the tests measure the resulting difference on near-calibrated data.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from segcalib.metrics.inputs import INCLUDE_BACKGROUND, case_samples, check_mode, check_probs_target, evaluated_classes
from segcalib.metrics.state import CaseSampleState
from segcalib.metrics.streaming import summed_copy

DEFAULT_NODES = 64001
_DENSITY_EPS = 1e-4  # relplot's BaseKernelMixin.smooth
_MIN_MESH = 200  # relplot.config.smECE_mesh_pts


def _linspace(n: int) -> np.ndarray:
    """``numpy.linspace(0, 1, n)``."""
    return np.linspace(0.0, 1.0, n)


def round_to_grid(x: torch.Tensor, weights: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """Linear rounding of weighted points ``x`` in [0, 1] onto ``n_nodes`` equispaced nodes
    (relplot's ``smooth_round_to_grid``), on the input's device; float64 ``(n_nodes,)``."""
    pos = x.double() * (n_nodes - 1)
    idx = pos.long().clamp_(0, n_nodes - 2)
    frac = pos - idx.double()
    w = weights.double()
    out = torch.zeros(n_nodes, dtype=torch.float64, device=x.device)
    out.index_add_(0, idx, (1.0 - frac) * w)
    out.index_add_(0, idx + 1, frac * w)
    return out


def _round_np(x: np.ndarray, weights: np.ndarray, n_nodes: int) -> np.ndarray:
    """:func:`round_to_grid` in NumPy (the bandwidth search runs on the host; see below)."""
    pos = x * (n_nodes - 1)
    idx = pos.astype(np.int64).clip(0, n_nodes - 2)
    frac = pos - idx
    return np.bincount(idx, (1.0 - frac) * weights, n_nodes) + np.bincount(idx + 1, frac * weights, n_nodes)


def _interpolate(t: np.ndarray, y: np.ndarray) -> np.ndarray:
    """relplot's ``interpolate``: piecewise-linear ``i/(len(y)-1) -> y[i]`` evaluated at ``t``."""
    g = y.shape[-1] - 1
    idx = (t * g).astype(np.int64).clip(0, g - 1)
    res = (t - idx * (1.0 / g)) / (1.0 / g)
    return y[..., idx] * (1 - res) + y[..., idx + 1] * res


def _reflected_smooth(grid: np.ndarray, sigma: float) -> np.ndarray:
    """relplot's ``ReflectedGaussianKernel.convolve`` on a ``(2, G)`` stack, by FFT."""
    g = grid.shape[-1]
    t = _linspace(g)
    ker = np.exp(-(t - 0.5) * (t - 0.5) / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma)
    ext = np.concatenate([grid[..., ::-1][..., :-1], grid, grid[..., ::-1][..., 1:]], -1)  # 3G - 2
    size = 1 << (ext.shape[-1] + g - 2).bit_length()
    full = np.fft.irfft(np.fft.rfft(ext, size) * np.fft.rfft(ker, size), size)
    start = g - 1 + g // 2  # 'valid' starts at G - 1; relplot keeps [G//2, G//2 + G) of it
    return full[..., start : start + g]


def smooth_ece_at(points: np.ndarray, counts: np.ndarray, residuals: np.ndarray, sigma: float) -> float:
    """relplot's ``smooth_ece(f, y, sigma)`` for weighted points (float64 NumPy, on the host:
    the arrays are small or already there, and torch's threaded CPU ops on ~1e5 elements wait on
    a busy machine far longer than they compute).

    Args:
        points: positions in [0, 1] (the scores ``f``, or fine-grid nodes).
        counts: weight of each point (1 per sample).
        residuals: summed ``f - y`` at each point.
        sigma: kernel bandwidth.
    """
    n_grid = max(2000, round(20 / sigma)) // 2 + 1
    grids = np.stack([_round_np(points, residuals, n_grid), _round_np(points, counts, n_grid)])
    smoothed = _reflected_smooth(grids, sigma)
    mesh = _linspace(max(round(10 / sigma), _MIN_MESH))
    ys, dens = _interpolate(mesh, smoothed)
    dens = dens + _DENSITY_EPS
    return float((np.abs(ys / dens) * dens).sum() / dens.sum())


def smooth_ece_fixed_point(
    points: np.ndarray, counts: np.ndarray, residuals: np.ndarray, eps: float = 0.001
) -> tuple[float, float]:
    """relplot's ``smECE``: ``(smECE at sigma*, sigma*)`` with its bisection (10 steps from 1)."""

    def wide_enough(alpha: float) -> bool:
        return alpha < eps or alpha < smooth_ece_at(points, counts, residuals, alpha)

    if wide_enough(1.0):
        sigma = 1.0
    else:
        sigma, end = 1.0, 0.0
        for _ in range(10):
            mid = (sigma + end) / 2
            if wide_enough(mid):
                end = mid
            else:
                sigma = mid
    return smooth_ece_at(points, counts, residuals, sigma), sigma


def _row_value(
    points: torch.Tensor, counts: torch.Tensor, residuals: torch.Tensor, sigma: float | None, eps: float
) -> tuple[float, float]:
    x, n, r = (v.detach().double().cpu().numpy() for v in (points, counts, residuals))
    if n.sum() <= 0:
        return math.nan, math.nan
    if sigma is not None:
        return smooth_ece_at(x, n, r, sigma), sigma
    return smooth_ece_fixed_point(x, n, r, eps)


def _result(values: list[tuple[float, float]]) -> dict[str, torch.Tensor]:
    per_row = torch.tensor([v for v, _ in values], dtype=torch.float64)
    sigma = torch.tensor([s for _, s in values], dtype=torch.float64)
    return {"smece": per_row.mean(), "smece_per_class": per_row, "sigma": sigma}


def smooth_ece(
    probs: torch.Tensor,
    target: torch.Tensor,
    mode: str = "top",
    include_background: bool = INCLUDE_BACKGROUND,
    sigma: float | None = None,
    exact: bool = True,
    n_nodes: int = DEFAULT_NODES,
    eps: float = 0.001,
) -> dict[str, torch.Tensor]:
    """Smooth ECE of all voxels of a batch (pooled), as ``relplot.smECE``.

    Args:
        probs: ``(B, C, *spatial)`` probabilities.
        target: ``(B, *spatial)`` or ``(B, 1, *spatial)`` integer labels.
        mode: ``"top"`` (confidence vs correctness, relplot's multiclass reduction) or
            ``"classwise"`` (``p_k`` vs ``[y == k]``, mean over the evaluated classes).
        include_background: average over class 0 too (class-wise mode).
        sigma: fixed bandwidth (relplot's ``smECE_sigma``); ``None`` = the fixed point.
        exact: from the samples; else from the ``n_nodes`` fine grid (see the module).
        n_nodes: nodes of the fine grid, ``L + 1``.
        eps: smallest bandwidth of the bisection.

    Returns:
        float64 ``smece`` (0-dim), ``smece_per_class`` and ``sigma`` (``(K,)``; ``(1,)`` in top mode).
    """
    probs, labels = check_probs_target(probs, target)
    check_mode(mode)
    classes = evaluated_classes(probs.shape[1], include_background)
    cases = case_samples(probs, labels, mode, classes)
    scores = torch.cat([s for s, _ in cases], 1)
    outcomes = torch.cat([o for _, o in cases], 1)
    if exact:
        values = [_row_value(s, torch.ones_like(s), s - o, sigma, eps) for s, o in zip(scores, outcomes)]
        return _result(values)
    grids = fine_grids(scores, outcomes, n_nodes)
    return _result(_grid_values(grids, sigma, eps))


def fine_grids(scores: torch.Tensor, outcomes: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """``(K, 2, n_nodes)`` linear roundings of the unit weights and the residuals ``f - y``."""
    return torch.stack(
        [
            torch.stack([round_to_grid(s, torch.ones_like(s), n_nodes), round_to_grid(s, s - o, n_nodes)])
            for s, o in zip(scores, outcomes)
        ]
    )


def _grid_values(grids: torch.Tensor, sigma: float | None, eps: float) -> list[tuple[float, float]]:
    nodes = torch.from_numpy(_linspace(grids.shape[-1]))
    return [_row_value(nodes, g[0], g[1], sigma, eps) for g in grids]


class SmoothECE(CaseSampleState):
    """Streaming smooth ECE from two fine grids per row (float64 ``grids`` ``(K, 2, n_nodes)``),
    merged by summation; ``compute()`` equals :func:`smooth_ece` with ``exact=False``."""

    def __init__(
        self,
        num_classes: int,
        mode: str = "top",
        include_background: bool = INCLUDE_BACKGROUND,
        sigma: float | None = None,
        n_nodes: int = DEFAULT_NODES,
        eps: float = 0.001,
    ) -> None:
        super().__init__()
        if not isinstance(n_nodes, int) or n_nodes < 3:
            raise ValueError(f"n_nodes must be an integer >= 3, got {n_nodes!r}")
        self.num_classes = num_classes
        self.mode = check_mode(mode)
        self.include_background = include_background
        self.sigma = sigma
        self.n_nodes = n_nodes
        self.eps = eps
        self.classes = evaluated_classes(num_classes, include_background)
        self.add_state("grids", (1 if mode == "top" else len(self.classes), 2, n_nodes))

    def _config(self) -> tuple[Any, ...]:
        return (self.num_classes, self.mode, self.include_background, self.sigma, self.n_nodes, self.eps)

    def _case_statistics(self, scores: torch.Tensor, outcomes: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"grids": fine_grids(scores, outcomes, self.n_nodes)}

    def compute(self) -> dict[str, torch.Tensor]:
        return _result(_grid_values(summed_copy(self.grids), self.sigma, self.eps))
