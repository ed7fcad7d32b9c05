"""Affine calibrators ``p = softmax(W x + b)`` on logits or log-probabilities, with ODIR regularisation.

``x`` is the logits ``z`` (vector / matrix scaling, Guo et al. 2017) or ``log softmax(z)`` (Dirichlet
calibration, Kull et al. NeurIPS 2019). ``W`` is diagonal (vector scaling) or full. The regulariser
is Kull et al.'s normalised ODIR (their code with ``reg_norm=True``, as in Fiducio 0.2):

    lambda_reg * mean_{i != j} W_ij^2  +  mu_reg * mean_j b_j^2

For the diagonal form ``lambda_reg`` pulls the scales towards 1 instead: ``lambda_reg * mean (w - 1)^2``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from segcalib.calibrators._lbfgs import minimize_nll
from segcalib.calibrators.base import SAFE_AFFINE, Spacing, check_positive_int, read_array
from segcalib.calibrators.sample import SampledCalibrator
from segcalib.errors import ConfigError
from segcalib.inference.temperature import DEFAULT_MAX_VOXELS, apply_temperature_


class AffineCalibrator(SampledCalibrator):
    """``softmax(W x + b)``; subclasses choose ``diagonal``, ``log_probs`` and ``translation_invariant``.

    ``translation_invariant`` constrains every row of ``W`` to the same (fitted) sum, so adding a constant
    to all logits of a voxel does not change the output. None of these maps preserves the argmax in
    general (unequal scales or any bias can swap two classes).
    """

    parameter_ranges = {"weight": SAFE_AFFINE, "bias": SAFE_AFFINE}
    diagonal: ClassVar[bool] = False
    log_probs: ClassVar[bool] = False
    translation_invariant: ClassVar[bool] = False

    def __init__(
        self,
        num_classes: int,
        *,
        seed: int = 0,
        max_voxels: int = DEFAULT_MAX_VOXELS,
        lambda_reg: float = 0.0,
        mu_reg: float = 0.0,
        max_iter: int = 200,
    ) -> None:
        for key, value in (("lambda_reg", lambda_reg), ("mu_reg", mu_reg)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ConfigError(f"calibrator '{self.name}': {key} must be a finite number >= 0, got {value!r}")
        check_positive_int(self.name, "max_iter", max_iter)
        super().__init__(
            num_classes, seed=seed, max_voxels=max_voxels, lambda_reg=float(lambda_reg), mu_reg=float(mu_reg),
            max_iter=max_iter,
        )
        self.lambda_reg, self.mu_reg, self.max_iter = float(lambda_reg), float(mu_reg), max_iter
        c = num_classes
        self.weight = torch.ones(c, dtype=torch.float64) if self.diagonal else torch.eye(c, dtype=torch.float64)
        self.bias = torch.zeros(c, dtype=torch.float64)

    # ----- the map ----------------------------------------------------------------------------
    def _inputs(self, z: Tensor, dim: int) -> Tensor:
        return torch.log_softmax(z, dim=dim) if self.log_probs else z

    @staticmethod
    def _constrained(raw: Tensor, row_sum: Tensor) -> Tensor:
        """``raw`` with each row shifted to sum to ``row_sum`` (the translation-invariant form)."""
        return raw - (raw.sum(dim=1, keepdim=True) - row_sum) / raw.shape[1]

    def _penalty(self, weight: Tensor, bias: Tensor) -> Tensor:
        value = bias.new_zeros(())
        if self.lambda_reg > 0:
            if self.diagonal:
                value = value + self.lambda_reg * (weight - 1).square().mean()
            else:
                off = ~torch.eye(weight.shape[0], dtype=torch.bool)
                value = value + self.lambda_reg * weight[off].square().mean()
        if self.mu_reg > 0:
            value = value + self.mu_reg * bias.square().mean()
        return value

    def _fit_sample(self, logits: Tensor, labels: Tensor, weights: Tensor) -> None:
        c = self.num_classes
        raw = (torch.ones(c) if self.diagonal else torch.eye(c)).double().requires_grad_(True)
        bias = torch.zeros(c, dtype=torch.float64, requires_grad=True)
        row_sum = torch.ones((), dtype=torch.float64, requires_grad=self.translation_invariant)
        params = [raw, bias] + ([row_sum] if self.translation_invariant else [])

        def weight() -> Tensor:
            return self._constrained(raw, row_sum) if self.translation_invariant else raw

        def calibrated(x: Tensor) -> Tensor:
            w, b = weight().to(x.dtype), bias.to(x.dtype)
            return (x * w if self.diagonal else x @ w.T) + b

        inputs = self._inputs(logits, dim=1)  # fixed during the fit: log softmax computed once, not per pass
        minimize_nll(
            params, calibrated, inputs, labels, weights, penalty=lambda: self._penalty(weight(), bias),
            max_iter=self.max_iter, owner=self.name,
        )
        self.weight, self.bias = weight().detach().clone(), bias.detach().clone()

    def _transform(self, logits: Tensor, *, spacing: Spacing, image: Tensor | None) -> Tensor:
        x = self._inputs(logits, dim=1)
        shape = (1, -1) + (1,) * (logits.dim() - 2)
        weight = self.weight.to(device=logits.device, dtype=torch.float32)
        bias = self.bias.to(device=logits.device, dtype=torch.float32).reshape(shape)
        out = x * weight.reshape(shape) if self.diagonal else torch.einsum("kc,bc...->bk...", weight, x)
        return apply_temperature_(out.add_(bias), 1.0)  # in-place softmax: no third volume

    # ----- fitted state -----------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {"weight": self.weight.tolist(), "bias": self.bias.tolist()}

    def _load_state(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        c = self.num_classes
        self.weight = read_array(self.name, state, "weight", (c,) if self.diagonal else (c, c))
        self.bias = read_array(self.name, state, "bias", (c,))
