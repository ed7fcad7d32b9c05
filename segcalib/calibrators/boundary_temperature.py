"""Boundary-aware temperature scaling (segcalib's own): T depends on the distance to the predicted boundary.

Segmentation networks are over-confident mostly near object boundaries, where one global temperature
must compromise between the boundary band and the (easy) interior and background. Here

    ``T(d) = exp(a + b * tanh(d / s) + c * exp(-d^2 / (2 s^2)))``,   ``p = softmax(z / T(d))``

where ``d`` is the signed distance in mm from the voxel to the *predicted* boundary: ``u`` = the
Euclidean distance (with the voxel spacing, centre to centre) to the nearest voxel whose argmax
class differs from the voxel's own, ``d = -u`` inside the predicted foreground (argmax != 0) and
``+u`` in the predicted background; voxels next to the boundary have ``|d|`` of one voxel spacing.
``c`` is a bump at the boundary, ``b`` the inside/outside asymmetry, ``a`` the level far away.
When a case has a single predicted class, ``|d|`` is taken as :data:`FAR_MM`.

``T`` is bounded below by ``min_temperature`` (default 0.5): the free fit drives the far-field
temperature to the floor of ``T_BOUNDS`` (0.01 on a CE+Dice hippocampus run, ``a`` = -11), which
makes every voxel far from the predicted boundary one-hot, so that a single confident error there
costs a hundred times its logit margin in NLL. Bounded at 0.5, the out-of-fold NLL and the ECE of
every region were equal or better on that run's 16 validation cases (docs/benchmarks.md).

``d`` comes from the argmax of the logits themselves (no ground truth), so it is computed the same
way at update and at transform time, with :func:`segcalib.spatial.distance_transform` on the
input's device; ``spacing`` is needed at both (``None`` means 1 mm). ``T`` is kept within
``T_BOUNDS`` = [0.01, 100]. The parameters ``a, b, c, log s`` are fitted by float64 L-BFGS on the
weighted NLL of the class-stratified voxel sample, which stores ``d`` as one extra column.

``T(d) > 0`` for every voxel, so the argmax and the per-voxel class order are preserved.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from segcalib.calibrators._lbfgs import minimize_nll
from segcalib.calibrators._newton import fit_inverse_temperature
from segcalib.calibrators.base import Spacing, check_positive_int, read_float
from segcalib.calibrators.registry import register_calibrator
from segcalib.calibrators.sample import SampledCalibrator, StratifiedSample, _labels_and_mask
from segcalib.errors import ConfigError, DataError
from segcalib.inference.temperature import DEFAULT_MAX_VOXELS, T_BOUNDS
from segcalib.spatial import distance_transform
from segcalib.spatial.spacing import spacing_per_case

DEFAULT_MIN_TEMPERATURE = 0.5  # far from the boundary a voxel may be made at most twice as sharp
LEGACY_MIN_TEMPERATURE = T_BOUNDS[0]  # the bound of files written before min_temperature existed
FAR_MM = 1e4  # |d| of voxels with no other predicted class in the case (keeps d and gradients finite)
_LOG_T_BOUNDS = (math.log(T_BOUNDS[0]), math.log(T_BOUNDS[1]))


def signed_boundary_distance(logits: Tensor, spacing: Spacing = None) -> Tensor:
    """Signed distance in mm ``(B, *S)`` (float32, on ``logits``' device) to the predicted boundary.

    Negative inside the predicted foreground (argmax != 0), positive in the predicted background;
    ``|d|`` is the distance to the nearest voxel of another predicted class, at most :data:`FAR_MM`.
    """
    pred = logits.argmax(dim=1)
    per_case = spacing_per_case(spacing, pred.shape[0], pred.dim() - 1)
    out = torch.empty(pred.shape, dtype=torch.float32, device=logits.device)
    for b in range(pred.shape[0]):
        u = out[b].fill_(FAR_MM)  # filled in place: one float32 volume besides one class's transform
        classes = pred[b].unique().tolist()
        if len(classes) > 1:
            for k in classes:
                own = pred[b] == k
                u[own] = distance_transform(own, per_case[b]).to(u.device)[own].float()
        u[pred[b] != 0] *= -1
    return out


def log_temperature(
    d: Tensor, a: Tensor, b: Tensor, c: Tensor, log_s: Tensor, min_temperature: float = T_BOUNDS[0]
) -> Tensor:
    """``log T(d) = a + b tanh(d/s) + c exp(-d^2 / (2 s^2))``, clamped to ``[log min_temperature, log T_max]``."""
    x = d / log_s.exp()
    return (a + b * torch.tanh(x) + c * torch.exp(-0.5 * x * x)).clamp(math.log(min_temperature), _LOG_T_BOUNDS[1])


@register_calibrator("boundary_temperature")
class BoundaryTemperatureScaling(SampledCalibrator):
    """Temperature as a smooth function of the signed distance (mm) to the predicted boundary.

    Fitted parameters: ``a``, ``b``, ``c`` (dimensionless) and ``s`` (mm). Preserves the argmax and
    the per-voxel order of the classes.

    Args:
        num_classes: C.
        seed: seed of the voxel sample.
        max_voxels: voxels kept in the sample (split equally between ground-truth classes).
        scale_mm: initial length scale ``s`` in mm (fitted with the rest).
        max_iter: L-BFGS iterations.
        min_temperature: lower bound of ``T(d)`` in [0.01, 1) (default 0.5; upper bound 100).
    """

    preserves_argmax = True
    preserves_order = True
    # 4 parameters: fitted on 500 k of the sample's voxels (test NLL of a CE+Dice hippocampus run
    # 0.034150 against 0.034152 on all 1 M, in a third of the time; docs/benchmarks.md)
    fit_voxels = 500_000

    def __init__(
        self,
        num_classes: int,
        *,
        seed: int = 0,
        max_voxels: int = DEFAULT_MAX_VOXELS,
        scale_mm: float = 3.0,
        max_iter: int = 200,
        min_temperature: float = DEFAULT_MIN_TEMPERATURE,
    ) -> None:
        super().__init__(num_classes, seed=seed, max_voxels=max_voxels, scale_mm=scale_mm, max_iter=max_iter,
                         min_temperature=min_temperature)
        low, high = T_BOUNDS
        if isinstance(min_temperature, bool) or not isinstance(min_temperature, (int, float)) or not (
            low <= min_temperature < 1.0
        ):
            raise ConfigError(
                f"calibrator 'boundary_temperature': min_temperature must be a number in [{low:g}, 1), "
                f"got {min_temperature!r}"
            )
        self.min_temperature = float(min_temperature)
        if isinstance(scale_mm, bool) or not isinstance(scale_mm, (int, float)) or not 0 < scale_mm < FAR_MM:
            raise ConfigError(
                f"calibrator 'boundary_temperature': scale_mm must be a number in (0, {FAR_MM:g}), got {scale_mm!r}"
            )
        self.scale_mm = float(scale_mm)
        self.max_iter = check_positive_int(self.name, "max_iter", max_iter)
        self.sample = self._new_sample()
        self.coefficients = {"a": 0.0, "b": 0.0, "c": 0.0, "s": self.scale_mm}

    @classmethod
    def from_params(cls, num_classes: int, params: dict[str, Any], tensors: dict[str, Tensor] | None = None):
        """As :meth:`Calibrator.from_params`; a file without ``min_temperature`` keeps the bound it was fitted with."""
        if isinstance(params, dict) and "min_temperature" not in params and "a" in params:
            params = {**params, "min_temperature": LEGACY_MIN_TEMPERATURE}
        return super().from_params(num_classes, params, tensors)

    def _new_sample(self) -> StratifiedSample:
        # C logit columns plus the distance column; labels never reach the extra stratum C
        c = self.num_classes
        return StratifiedSample(c + 1, self.max_voxels + self.max_voxels // c, self.seed)

    def update(
        self,
        logits: Tensor,
        target: Tensor,
        mask: Tensor | None = None,
        *,
        spacing: Spacing = None,
        image: Tensor | None = None,
    ) -> None:
        """Offer one batch; ``spacing`` (mm per case) sets the distances (``None``: 1 mm)."""
        self._check_logits(logits)
        try:
            _labels_and_mask(logits, target, mask, self.num_classes)  # labels within 0..C-1 in the region
            d = signed_boundary_distance(logits.detach().float(), spacing)
        except ValueError as exc:
            raise DataError(f"calibrator '{self.name}': {exc}") from None
        super().update(torch.cat([logits.detach().float(), d.unsqueeze(1)], dim=1), target, mask)

    def reset(self) -> None:
        self.sample = self._new_sample()
        self.fitted = False

    def _fit_sample(self, logits: Tensor, labels: Tensor, weights: Tensor) -> None:
        a = torch.zeros((), dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        c = torch.zeros((), dtype=torch.float64, requires_grad=True)
        log_s = torch.tensor(math.log(self.scale_mm), dtype=torch.float64, requires_grad=True)
        # a global temperature first (Newton on 1/T, within the bounds), then the distance terms from there
        u = fit_inverse_temperature(logits[:, :-1], labels, weights, max_iter=self.max_iter, owner=self.name)
        with torch.no_grad():
            a.fill_(min(max(-math.log(u), math.log(self.min_temperature)), _LOG_T_BOUNDS[1]))
        minimize_nll([a, b, c, log_s], lambda zd: self._scaled(zd, a, b, c, log_s), logits, labels, weights,
                     max_iter=self.max_iter, owner=self.name)
        a, b, c, s = (float(v.detach()) for v in (a, b, c, log_s.exp()))
        self.coefficients = {"a": a, "b": b, "c": c, "s": s}

    def _scaled(self, zd: Tensor, a: Tensor, b: Tensor, c: Tensor, log_s: Tensor) -> Tensor:
        """Logits ``z / T(d)`` from sample rows ``[z, d]`` (``(n, C + 1)``, computed in their dtype)."""
        a, b, c, log_s = (v.to(zd.dtype) for v in (a, b, c, log_s))
        return zd[:, :-1] / log_temperature(zd[:, -1:], a, b, c, log_s, self.min_temperature).exp()

    def temperature_at(self, d: Tensor) -> Tensor:
        """The fitted ``T(d)`` for signed distances ``d`` in mm (float64)."""
        co = {k: torch.tensor(v, dtype=torch.float64, device=d.device) for k, v in self.coefficients.items()}
        return log_temperature(d.double(), co["a"], co["b"], co["c"], co["s"].log(), self.min_temperature).exp()

    def _transform(self, logits: Tensor, *, spacing: Spacing, image: Tensor | None) -> Tensor:
        try:
            d = signed_boundary_distance(logits, spacing)
        except ValueError as exc:
            raise DataError(f"calibrator '{self.name}': {exc}") from None
        t = self.temperature_at(d).float()
        return torch.softmax(logits / t.unsqueeze(1), dim=1)

    def _state(self) -> dict[str, Any]:
        return dict(self.coefficients)

    def _load_state(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        self.coefficients = {
            "a": read_float(self.name, state, "a"),
            "b": read_float(self.name, state, "b"),
            "c": read_float(self.name, state, "c"),
            "s": read_float(self.name, state, "s", positive=True),
        }
