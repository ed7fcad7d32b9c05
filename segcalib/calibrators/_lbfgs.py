"""Weighted-NLL minimisation by L-BFGS over float64 parameters, streamed over chunks of the voxel sample.

The objective is ``sum_i w_i * NLL(softmax(f(z_i)), y_i) / sum_i w_i + penalty()``. The sample is kept
in float32 and each chunk is evaluated in float32 (``f`` casts the parameters to the chunk's dtype);
the per-voxel NLLs are promoted to float64 before they are weighted and summed, so the objective is
accumulated in float64 (its rounding noise stays far below L-BFGS's ``tolerance_change``) while the
arithmetic over voxels runs at float32 speed. The fit needs the sample plus one chunk's graph in memory.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from segcalib.errors import DataError

CHUNK_VOXELS = 1 << 18


def weighted_nll(
    calibrated: Callable[[Tensor], Tensor], logits: Tensor, labels: Tensor, weights: Tensor, *, backward: bool = False
) -> float:
    """``sum w * NLL / sum w`` of ``calibrated(z)`` over the sample (``z``: a chunk of ``logits (n, C)``
    in their own dtype; the result of ``calibrated`` may be float32 or float64).

    ``labels`` may be any integer dtype and ``weights`` any float dtype.

    With ``backward=True`` the gradient of that value is accumulated into the parameters' ``.grad``.
    """
    total_weight = float(weights.sum(dtype=torch.float64))
    value = 0.0
    for start in range(0, logits.shape[0], CHUNK_VOXELS):
        stop = start + CHUNK_VOXELS
        z = logits[start:stop]
        nll = F.cross_entropy(calibrated(z), labels[start:stop].long(), reduction="none")
        part = (nll.double() * weights[start:stop].double()).sum() / total_weight
        if backward:
            part.backward()
        value += float(part.detach())
    return value


def minimize_nll(
    params: list[Tensor],
    calibrated: Callable[[Tensor], Tensor],
    logits: Tensor,
    labels: Tensor,
    weights: Tensor,
    *,
    penalty: Callable[[], Tensor] | None = None,
    max_iter: int = 200,
    owner: str = "calibrator",
) -> float:
    """Minimise the weighted NLL (+ ``penalty()``) over float64 leaf tensors ``params`` in place.

    Returns the final objective. Raises DataError if it is not finite (non-finite inputs).
    """
    optimiser = torch.optim.LBFGS(
        params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-7,  # Fiducio-like: stop when the NLL stops moving
        history_size=20, line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimiser.zero_grad()
        value = weighted_nll(calibrated, logits, labels, weights, backward=True)
        if penalty is not None:
            extra = penalty()
            if extra.requires_grad:
                extra.backward()
            value += float(extra.detach())
        return torch.tensor(value, dtype=torch.float64)

    optimiser.step(closure)
    with torch.no_grad():
        final = weighted_nll(calibrated, logits, labels, weights)
        if penalty is not None:
            final += float(penalty())
    if not math.isfinite(final) or not all(torch.isfinite(p).all() for p in params):
        raise DataError(f"calibrator '{owner}': the fit diverged (objective {final}); are the inputs finite?")
    return final
