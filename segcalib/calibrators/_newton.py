"""The temperature that minimises the weighted NLL, by Newton's method on the inverse temperature.

With ``u = 1 / T`` the objective ``f(u) = sum_i w_i [logsumexp(u z_i) - u z_{i,y_i}] / sum_i w_i`` is
convex: ``f'(u) = mean_w(E_p[z] - z_y)`` and ``f''(u) = mean_w(Var_p[z]) >= 0`` with
``p = softmax(u z)``. Newton's method from ``u = 1`` (halving a step that would leave ``u > 0`` or
raise ``f``) reaches the minimum to ``tol`` in a handful of passes over the sample, each one read of
the logits in float32 with float64 sums -- instead of the dozens of forward and backward passes of a
generic L-BFGS fit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from segcalib.errors import DataError

CHUNK_ROWS = 1 << 18


PASSES = [0]  # passes over the sample so far (for benchmarks and tests)


def _moments(u: float, logits: Tensor, labels: Tensor, weights: Tensor) -> tuple[float, float, float]:
    """``(f(u), f'(u), f''(u))`` of the weighted mean NLL, summed in float64."""
    PASSES[0] += 1
    value = grad = curvature = 0.0
    total = float(weights.sum(dtype=torch.float64))
    for start in range(0, logits.shape[0], CHUNK_ROWS):
        z = logits[start : start + CHUNK_ROWS].float()
        y = labels[start : start + CHUNK_ROWS].long()
        w = weights[start : start + CHUNK_ROWS].double()
        scaled = z * u
        log_p = torch.log_softmax(scaled, dim=1)
        p = log_p.exp()
        z_y = z.gather(1, y.unsqueeze(1)).squeeze(1)
        mean_z = (p * z).sum(1)
        var_z = (p * z * z).sum(1) - mean_z * mean_z
        value += float((-log_p.gather(1, y.unsqueeze(1)).squeeze(1).double() * w).sum())
        grad += float(((mean_z - z_y).double() * w).sum())
        curvature += float((var_z.clamp_min(0).double() * w).sum())
    return value / total, grad / total, curvature / total


def fit_inverse_temperature(
    logits: Tensor, labels: Tensor, weights: Tensor, *, max_iter: int = 50, gain: float = 1e-10,
    owner: str = "temperature",
) -> float:
    """``u = 1 / T`` minimising the weighted NLL of ``softmax(u z)`` (``logits (N, C)``, ``labels (N,)``,
    ``weights (N,)``). Stops when the gain Newton's model predicts (``f'^2 / 2 f''``) is below ``gain``
    times the objective (about where float32 terms summed in float64 stop resolving it), when no step
    lowers it beyond that noise, or after ``max_iter``."""
    u = 1.0
    value, grad, curvature = _moments(u, logits, labels, weights)
    for _ in range(max_iter):
        if not math.isfinite(value) or grad == 0:
            break
        if curvature > 0:
            if grad * grad / (2 * curvature) <= gain * abs(value):
                break
            step = grad / curvature
        else:  # flat: every voxel's logits are equal; move towards lower NLL
            step = math.copysign(0.5 * u, grad)
        scale, accepted = 1.0, None
        while scale > 1e-3:
            candidate = u - scale * step
            if candidate > 0:
                new = _moments(candidate, logits, labels, weights)
                if new[0] <= value + gain * abs(value):
                    accepted = candidate, new
                    break
            scale /= 2
        if accepted is None:
            break
        u, (value, grad, curvature) = accepted[0], accepted[1]
    if not (math.isfinite(value) and math.isfinite(u)):
        raise DataError(f"calibrator '{owner}': the temperature fit diverged (objective {value}); are the inputs finite?")
    return u
