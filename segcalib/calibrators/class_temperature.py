"""Class-wise temperature scaling: ``p_k ∝ exp(z_k / T_k)``, one temperature per class."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from segcalib.calibrators._lbfgs import minimize_nll
from segcalib.calibrators.base import SAFE_TEMPERATURE, Spacing, check_positive_int, read_array
from segcalib.calibrators.registry import register_calibrator
from segcalib.calibrators.sample import SampledCalibrator
from segcalib.calibrators.temperature import clamp_temperature
from segcalib.errors import DataError
from segcalib.inference.temperature import DEFAULT_MAX_VOXELS, apply_temperature_


@register_calibrator("class_temperature")
class ClassTemperatureScaling(SampledCalibrator):
    """``softmax(z / T)`` with ``T (C,) > 0`` per class, fitted by float64 L-BFGS on ``log T`` from 1.

    Does NOT preserve the argmax: different temperatures rescale classes differently, so
    ``z = (2, 1)``, ``T = (2, 0.5)`` gives ``(1, 2)``. It equals vector scaling with positive scales
    and no bias: raising ``z_k`` with the other logits fixed never lowers ``p_k``. Each ``T_k`` is kept
    within [0.01, 100] like the global temperature.

    Args:
        max_iter: L-BFGS iterations. seed, max_voxels: the voxel sample.
    """

    parameter_ranges = {"temperatures": SAFE_TEMPERATURE}

    def __init__(
        self, num_classes: int, *, seed: int = 0, max_voxels: int = DEFAULT_MAX_VOXELS, max_iter: int = 200
    ) -> None:
        super().__init__(num_classes, seed=seed, max_voxels=max_voxels, max_iter=max_iter)
        self.max_iter = check_positive_int(self.name, "max_iter", max_iter)
        self.temperatures = torch.ones(num_classes, dtype=torch.float64)

    def _fit_sample(self, logits: Tensor, labels: Tensor, weights: Tensor) -> None:
        log_t = torch.zeros(self.num_classes, dtype=torch.float64, requires_grad=True)
        minimize_nll(
            [log_t], lambda z: z / log_t.exp().to(z.dtype), logits, labels, weights, max_iter=self.max_iter, owner=self.name
        )
        values = [clamp_temperature(self.name, float(t)) for t in log_t.detach().exp()]
        self.temperatures = torch.tensor(values, dtype=torch.float64)

    def _transform(self, logits: Tensor, *, spacing: Spacing, image: Tensor | None) -> Tensor:
        shape = (1, -1) + (1,) * (logits.dim() - 2)
        t = self.temperatures.to(device=logits.device, dtype=torch.float32).reshape(shape)
        return apply_temperature_(logits / t, 1.0)  # in-place softmax of the fresh quotient

    def _state(self) -> dict[str, Any]:
        return {"temperatures": self.temperatures.tolist()}

    def _load_state(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        values = read_array(self.name, state, "temperatures", (self.num_classes,))
        if not (values > 0).all():
            raise DataError(
                f"calibrator '{self.name}': parameter 'temperatures' must be positive, got {values.tolist()}"
            )
        self.temperatures = values
