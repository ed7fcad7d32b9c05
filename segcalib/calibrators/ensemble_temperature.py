"""Ensemble temperature scaling (ETS; Zhang, Kailkhura & Han, "Mix-n-Match", ICML 2020).

``p = w1 * softmax(z / T) + w2 * softmax(z) + w3 / C`` with weights on the simplex. As in the
reference code (zhang64-llnl/Mix-n-Match-Calibration) T is fitted first (temperature scaling), then
the weights with T fixed; segcalib minimises the (sample-weighted) NLL in both steps, in float64 by
L-BFGS, with the weights parametrised by a softmax (so ``w > 0``).

Both softmax terms keep the per-voxel order of the classes and the uniform term adds the same value
to every class, so the order and the argmax are preserved (``preserves_order = preserves_argmax =
True``; ties aside, e.g. when ``w3`` takes nearly all the weight).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from segcalib.calibrators._lbfgs import minimize_nll
from segcalib.calibrators.base import Spacing, read_array, read_float
from segcalib.calibrators.registry import register_calibrator
from segcalib.calibrators.temperature import TemperatureScaling
from segcalib.errors import DataError
from segcalib.inference.temperature import DEFAULT_MAX_VOXELS


def ensemble_log_probs(logits: Tensor, temperature: float, log_weights: Tensor) -> Tensor:
    """``log(w1 softmax(z/T) + w2 softmax(z) + w3/C)`` over axis 1, from ``log_weights (3,)`` (log w)."""
    shape = [1] * logits.dim()
    shape[1] = 1
    parts = torch.stack(
        [
            log_weights[0] + torch.log_softmax(logits / temperature, dim=1),
            log_weights[1] + torch.log_softmax(logits, dim=1),
            (log_weights[2] - math.log(logits.shape[1])).reshape(shape).expand_as(logits),
        ]
    )
    return torch.logsumexp(parts, dim=0)


@register_calibrator("ensemble_temperature")
class EnsembleTemperatureScaling(TemperatureScaling):
    """Mix-n-Match ETS: a weighted mixture of the tempered, the raw and the uniform distribution.

    Fitted parameters: ``temperature`` and ``weights`` ``[w1, w2, w3]`` (sum 1). Preserves the argmax
    and the per-voxel order of the classes.

    Args:
        num_classes: C.
        seed: seed of the voxel sample.
        max_voxels: voxels kept in the sample (split equally between ground-truth classes).
        max_iter: L-BFGS iterations per step.
    """

    preserves_argmax = True
    preserves_order = True

    def __init__(
        self, num_classes: int, *, seed: int = 0, max_voxels: int = DEFAULT_MAX_VOXELS, max_iter: int = 100
    ) -> None:
        super().__init__(num_classes, seed=seed, max_voxels=max_voxels, max_iter=max_iter)
        self.weights = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)

    def _fit_sample(self, logits: Tensor, labels: Tensor, weights: Tensor) -> None:
        super()._fit_sample(logits, labels, weights)  # T first, as plain temperature scaling fits it
        # start near plain temperature scaling; the NLL is convex in the weights
        theta = torch.tensor([0.0, -4.0, -4.0], dtype=torch.float64, requires_grad=True)
        c = self.num_classes
        # T is fixed now: both log-softmax terms are computed once, not on every L-BFGS pass
        fixed = torch.cat([torch.log_softmax(logits / self.temperature, dim=1), torch.log_softmax(logits, dim=1)], 1)

        def mixture(x: Tensor) -> Tensor:
            log_w = torch.log_softmax(theta, dim=0).to(x.dtype)
            uniform = (log_w[2] - math.log(c)).expand(x.shape[0], c)
            return torch.logsumexp(torch.stack([log_w[0] + x[:, :c], log_w[1] + x[:, c:], uniform]), dim=0)

        minimize_nll([theta], mixture, fixed, labels, weights, max_iter=self.max_iter, owner=self.name)
        self.weights = torch.softmax(theta.detach(), dim=0)

    def _transform(self, logits: Tensor, *, spacing: Spacing, image: Tensor | None) -> Tensor:
        log_w = self.weights.clamp_min(1e-300).log()
        return ensemble_log_probs(logits.double(), self.temperature, log_w.to(logits.device)).exp_().float()

    def _state(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "weights": self.weights.tolist()}

    def _load_state(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        self.temperature = read_float(self.name, state, "temperature", positive=True)
        w = read_array(self.name, state, "weights", (3,))
        if bool((w < 0).any()) or abs(float(w.sum()) - 1.0) > 1e-6:
            raise DataError(
                f"calibrator '{self.name}': parameter 'weights' must be 3 non-negative numbers summing to 1"
            )
        self.weights = w
