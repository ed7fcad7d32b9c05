"""Kernel calibration error, KCE (Widmann, Lindsten & Zachariah, "Calibration tests in multi-class
classification: A unifying framework", NeurIPS 2019), the kernel measure Metrics Reloaded lists.

Canonical (whole-vector) calibration of voxel probabilities ``p_i`` with labels ``y_i``: with the
residual ``r_i = e_{y_i} - p_i`` and the matrix-valued kernel ``k(p, q) I`` of the scalar
exponential (Laplacian) kernel ``k(p, q) = exp(-||p - q||_2 / bandwidth)``,

    h_ij = k(p_i, p_j) <r_i, r_j>,
    SKCE_unbiased = 2 / (n (n - 1)) sum_{i<j} h_ij    (U-statistic; can be negative),
    SKCE_biased   = 1 / n^2 sum_{i,j} h_ij            (V-statistic; >= 0),

and ``KCE = sqrt(max(SKCE_biased, 0))``. This is the squared kernel calibration error of Widmann
et al. with a tensor-product kernel of the exponential kernel and the white kernel on labels (the
defaults of their CalibrationErrors.jl). With ``include_background=False`` the inner product
``<r_i, r_j>`` runs over classes ``1..C-1`` (the kernel ``k(p,q) diag(0,1,..,1)`` is still a valid
matrix-valued kernel); the distance uses all classes.

The estimators cost O(n^2) pairs, so they are exact on at most ``max_samples`` voxels (default
4096, evaluated in row blocks of bounded memory). Larger inputs raise, unless ``sample=True``:
then ``max_samples`` voxels are drawn uniformly without replacement with a seeded generator (the
estimate is then that of the sample). Being a U/V-statistic over pairs, it has no state that
merges by summation, so there is no streaming class.
"""

from __future__ import annotations

import torch

from segcalib.metrics.inputs import INCLUDE_BACKGROUND, check_probs_target, evaluated_classes
from segcalib.metrics.surface import linear_percentile

DEFAULT_MAX_SAMPLES = 4096
_BLOCK_ROWS = 1024


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances without the ``|a|^2 + |b|^2 - 2ab`` shortcut (which loses ~1e-10)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _bandwidth(p: torch.Tensor, bandwidth: float | str) -> float:
    if bandwidth == "median":
        n = p.shape[0]
        iu = torch.triu_indices(n, n, 1, device=p.device)
        d = _distances(p, p)[iu[0], iu[1]]
        value = float(linear_percentile(d, 50.0)) if d.numel() else 0.0
        if not value > 0:
            raise ValueError("median heuristic gave bandwidth 0 (all probability vectors equal); pass a number")
        return value
    if not isinstance(bandwidth, (int, float)) or not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0 or 'median', got {bandwidth!r}")
    return float(bandwidth)


def skce_pairs(p: torch.Tensor, r: torch.Tensor, bandwidth: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_{i != j} h_ij, sum_i h_ii)`` for float64 ``p (n, C)`` and residuals ``r (n, C')``."""
    total = p.new_zeros(())
    for start in range(0, p.shape[0], _BLOCK_ROWS):
        rows = slice(start, start + _BLOCK_ROWS)
        k = torch.exp(-_distances(p[rows], p) / bandwidth)
        total = total + (k * (r[rows] @ r.T)).sum()
    diag = (r * r).sum()  # k(p, p) = 1
    return total - diag, diag


def kernel_calibration_error(
    probs: torch.Tensor,
    target: torch.Tensor,
    bandwidth: float | str = 1.0,
    include_background: bool = INCLUDE_BACKGROUND,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    sample: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """SKCE / KCE of the voxels of a batch (pooled over cases).

    Args:
        probs: ``(B, C, *spatial)`` probabilities.
        target: ``(B, *spatial)`` or ``(B, 1, *spatial)`` integer labels.
        bandwidth: of the exponential kernel (in units of the Euclidean distance between
            probability vectors, at most sqrt(2)), or ``"median"`` for the median pairwise
            distance (midpoint of the two middle values for an even count, as ``numpy.median``).
        include_background: class 0 in the residual inner product.
        max_samples: most voxels used (O(n^2) pairs).
        sample: with more voxels than ``max_samples``, draw ``max_samples`` of them (seeded)
            instead of raising.
        seed: of the sample.

    Returns:
        float64 0-dim ``skce_unbiased`` (NaN for n < 2), ``skce_biased``, ``kce``, and ``n_samples``.
    """
    probs, labels = check_probs_target(probs, target)
    c = probs.shape[1]
    classes = evaluated_classes(c, include_background)
    p = probs.movedim(1, -1).reshape(-1, c).double()
    y = labels.reshape(-1)
    n = p.shape[0]
    if n > max_samples:
        if not sample:
            raise ValueError(
                f"{n} voxels exceed max_samples={max_samples} (the estimator is O(n^2)); "
                "pass sample=True to use a seeded random subset"
            )
        gen = torch.Generator().manual_seed(seed)
        keep = torch.randperm(n, generator=gen)[:max_samples].to(p.device)
        p, y, n = p[keep], y[keep], max_samples
    r = torch.nn.functional.one_hot(y, c).double() - p
    r = r[:, classes]
    nan = p.new_tensor(float("nan"))
    if n == 0:
        return {"skce_unbiased": nan, "skce_biased": nan, "kce": nan, "n_samples": p.new_tensor(0.0)}
    off, diag = skce_pairs(p, r, _bandwidth(p, bandwidth))
    biased = (off + diag) / (n * n)
    unbiased = off / (n * (n - 1)) if n > 1 else nan
    return {
        "skce_unbiased": unbiased,
        "skce_biased": biased,
        "kce": biased.clamp(min=0).sqrt(),
        "n_samples": p.new_tensor(float(n)),
    }
