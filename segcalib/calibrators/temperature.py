"""Temperature scaling (Guo et al., ICML 2017): ``p = softmax(z / T)`` with one ``T > 0``.

Dividing every logit by the same positive number keeps the order of the classes in every voxel, so
the argmax (the segmentation) is unchanged; only the confidence moves.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from segcalib.calibrators._newton import fit_inverse_temperature
from segcalib.calibrators.base import SAFE_TEMPERATURE, Spacing, check_positive_int, read_float
from segcalib.calibrators.registry import register_calibrator
from segcalib.calibrators.sample import SampledCalibrator
from segcalib.inference.temperature import DEFAULT_MAX_VOXELS, T_BOUNDS, apply_temperature

log = logging.getLogger("segcalib")


def clamp_temperature(owner: str, value: float) -> float:
    """``value`` clamped to :data:`~segcalib.inference.temperature.T_BOUNDS`, with a warning when it moves."""
    low, high = T_BOUNDS
    if low <= value <= high:
        return value
    clamped = min(max(value, low), high)
    log.warning(
        "calibrator '%s': fitted temperature %.4g is outside [%g, %g]; using %g (the predictions on these "
        "voxels carry little information: is the model trained?)", owner, value, low, high, clamped
    )
    return clamped


@register_calibrator("temperature")
class TemperatureScaling(SampledCalibrator):
    """One temperature for every class and voxel, fitted by Newton's method on ``1 / T`` (convex).

    Preserves the argmax and the per-voxel order of the classes (``T > 0``). The fitted ``T`` is kept
    within ``T_BOUNDS`` = [0.01, 100] as in :func:`segcalib.inference.temperature.fit_temperature`.

    Args:
        num_classes: C.
        seed: seed of the voxel sample.
        max_voxels: voxels kept in the sample (split equally between ground-truth classes).
        max_iter: Newton iterations.
    """

    preserves_argmax = True
    preserves_order = True
    parameter_ranges = {"temperature": SAFE_TEMPERATURE}

    def __init__(
        self, num_classes: int, *, seed: int = 0, max_voxels: int = DEFAULT_MAX_VOXELS, max_iter: int = 100
    ) -> None:
        super().__init__(num_classes, seed=seed, max_voxels=max_voxels, max_iter=max_iter)
        self.max_iter = check_positive_int(self.name, "max_iter", max_iter)
        self.temperature = 1.0

    def _fit_sample(self, logits: Tensor, labels: Tensor, weights: Tensor) -> None:
        # the NLL is convex in 1/T: Newton's method, a few passes (max_iter bounds its iterations)
        value = 1.0 / fit_inverse_temperature(logits, labels, weights, max_iter=self.max_iter, owner=self.name)
        if not math.isfinite(value):
            raise ValueError(f"calibrator '{self.name}': temperature fit diverged (T = {value})")
        self.temperature = clamp_temperature(self.name, value)

    def _transform(self, logits: Tensor, *, spacing: Spacing, image: Tensor | None) -> Tensor:
        return apply_temperature(logits, self.temperature)

    def _state(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def _load_state(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        self.temperature = read_float(self.name, state, "temperature", positive=True)
