"""Class-adaptive label smoothing (CALS): class-wise multipliers learnt by an augmented Lagrangian."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from segcalib.losses._checks import check_bool, check_float, check_int, set_multiplier_schedule
from segcalib.losses._inputs import LossInputs
from segcalib.losses._margin_ce import logit_constraints, penalised_cross_entropy, per_class
from segcalib.losses._penalties import PENALTIES
from segcalib.losses.base import AdaptiveLoss
from segcalib.losses.registry import register_loss
from segcalib.utils.distributed import all_reduce_sum
from segcalib.utils.tensors import HALF_DTYPES


@register_loss("cals")
class ClassAdaptiveLoss(AdaptiveLoss):
    """``CE + mean_{i,k} P(h_ik; lambda_k, rho_k)`` with ``h_ik = (max_j z_ij - z_ik - m)/m``
    (``normalize=False``: ``d - m``) and ``P`` the PHR, P2 or P3 penalty-Lagrangian (SPEC §2).

    Outer update (``accumulate`` on each validation batch, then ``step`` once per epoch), with
    the current lambda and rho, over all validation voxels i (no labels):

    - every ``lambda_step`` epochs: ``lambda_k <- clamp(mean_i clamp(P'(h_ik), lmin, lmax), lmin, lmax)``;
    - ``c_k = mean_i h_ik``; every ``rho_step`` epochs (0: never) once a previous ``c`` exists:
      ``rho_k <- gamma * rho_k`` where ``c_k > tau * max(c_prev_k, 0)``, clamped to [rho_init, rho_max];
    - ``c_prev <- c`` every epoch; lambda is updated with the old rho, then rho.

    Under ``torch.distributed`` the (sum, count) accumulators are all-reduced before dividing,
    so the update equals a single process's on the whole validation set. State (``lambdas``,
    ``rhos``, ``previous_constraint``, ``epoch``) is in buffers, hence in ``state_dict``.

    Liu et al., "Class Adaptive Network Calibration", CVPR 2023. Components: ``ce``, ``penalty``.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        margin: float = 10.0,
        penalty: str = "phr",
        normalize: bool = True,
        lambda_min: float = 1e-6,
        lambda_max: float = 1e6,
        lambda_step: int = 1,
        rho_init: float = 1.0,
        rho_max: float = 10.0,
        rho_step: int = 10,
        gamma: float = 1.2,
        tau: float = 0.9,
        ignore_index: int = -100,
    ) -> None:
        super().__init__(ignore_index=ignore_index)
        name = self.name
        self.num_classes = check_int(name, "num_classes", num_classes, low=1)
        self.normalize = check_bool(name, "normalize", normalize)
        self.margin = check_float(name, "margin", margin, low=0.0, low_open=self.normalize)
        set_multiplier_schedule(
            self, name, penalty=penalty, lambda_min=lambda_min, lambda_max=lambda_max, lambda_step=lambda_step,
            rho_init=rho_init, rho_max=rho_max, rho_step=rho_step, gamma=gamma, tau=tau, penalties=tuple(PENALTIES),
        )
        self._penalty = PENALTIES[self.penalty]
        self._scale = 1.0 / self.margin if self.normalize else 1.0

        classes = self.num_classes
        self.register_buffer("lambdas", torch.full((classes,), self.lambda_min))
        self.register_buffer("rhos", torch.full((classes,), self.rho_init))
        self.register_buffer("previous_constraint", torch.zeros(classes, dtype=torch.float64))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.int64))
        # Per-epoch sums over validation voxels: rows = clamped P'(h), h, max(h, 0); and their count.
        self.register_buffer("_sums", torch.zeros(3, classes, dtype=torch.float64), persistent=False)
        self.register_buffer("_count", torch.zeros((), dtype=torch.float64), persistent=False)

    def _check_classes(self, logits: Tensor) -> None:
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"{self.name} was built for {self.num_classes} classes, got logits {tuple(logits.shape)}")

    def compute(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        self._check_classes(inputs.source_logits)
        loss, ce, penalty = penalised_cross_entropy(
            inputs, self._penalty, self.margin, self._scale, self.lambdas, self.rhos
        )
        return loss, {"ce": ce, "penalty": penalty}

    @torch.no_grad()
    def accumulate(self, val_logits: Tensor, val_target: Tensor | None = None) -> None:
        """Add the statistics of one validation batch ``(B, C, *spatial)`` to this epoch's sums
        (``val_target`` is accepted for the common interface and not used: the update needs no labels)."""
        self._check_classes(val_logits)
        logits = val_logits.float() if val_logits.dtype in HALF_DTYPES else val_logits
        with torch.autocast(device_type=logits.device.type, enabled=False):
            h = logit_constraints(logits, logits.amax(1, keepdim=True), self.margin, self._scale)
            dims = (0, *range(2, h.dim()))
            constraint = h.sum(dims, dtype=torch.float64)
            violation = h.clamp_min(0).sum(dims, dtype=torch.float64)
            slope = self._penalty.derivative(h, per_class(self.lambdas, h), per_class(self.rhos, h))
            slope = slope.clamp_(self.lambda_min, self.lambda_max).sum(dims, dtype=torch.float64)
        self._sums += torch.stack([slope, constraint, violation]).to(self._sums.device)
        self._count += logits.numel() // self.num_classes

    @torch.no_grad()
    def step(self) -> None:
        """End of epoch: update lambda (then rho) from the accumulated validation statistics, reset the sums."""
        packed = all_reduce_sum(torch.cat([self._sums.flatten(), self._count.reshape(1)]))
        count = float(packed[-1])
        if count == 0:
            raise RuntimeError(f"{self.name}.step() needs accumulate() on at least one validation batch first")
        means = packed[:-1].reshape(3, self.num_classes) / count
        epoch = int(self.epoch) + 1
        self._update_lambdas(means, epoch)
        self._update_rhos(means[1], epoch)
        self.epoch.fill_(epoch)
        self._sums.zero_()
        self._count.zero_()

    def _update_lambdas(self, means: Tensor, epoch: int) -> None:
        if epoch % self.lambda_step == 0:
            self.lambdas.copy_(means[0].clamp(self.lambda_min, self.lambda_max))

    def _update_rhos(self, constraint: Tensor, epoch: int) -> None:
        if self.rho_step > 0 and epoch % self.rho_step == 0 and epoch > 1:
            grow = constraint > self.tau * self.previous_constraint.clamp_min(0)
            rhos = torch.where(grow, self.rhos * self.gamma, self.rhos)
            self.rhos.copy_(rhos.clamp(self.rho_init, self.rho_max))
        self.previous_constraint.copy_(constraint)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, margin={self.margin}, penalty={self.penalty!r}, "
            f"normalize={self.normalize}, {super().extra_repr()}"
        )


@register_loss("cals_heuristic")
class HeuristicClassAdaptiveLoss(ClassAdaptiveLoss):
    """CALS with a heuristic multiplier rule instead of the Lagrangian one: the training loss, the
    rho update and the state are those of ``cals``, but after each validation pass, every
    ``lambda_step`` epochs once a previous value exists,
    ``lambda_k <- clamp(lambda_k * gamma, lmin, lmax)`` if the class's mean margin violation
    ``v_k = mean_i max(h_ik, 0)`` grew since the previous epoch, else ``lambda_k / gamma``.
    ``lambda_init`` (default 1.0, the slope of the normalised PHR penalty at the margin that
    matches MbLS with alpha = 0.1 at m = 10) replaces the Lagrangian start at ``lambda_min``.

    A segcalib variant, not in SPEC: a cheap class-wise baseline to compare the Lagrangian update with.
    Components: ``ce``, ``penalty``.
    """

    def __init__(self, *, lambda_init: float = 1.0, **params: Any) -> None:
        super().__init__(**params)
        self.lambda_init = check_float(self.name, "lambda_init", lambda_init, low=self.lambda_min, high=self.lambda_max)
        self.lambdas.fill_(self.lambda_init)
        self.register_buffer("previous_violation", torch.zeros(self.num_classes, dtype=torch.float64))

    def _update_lambdas(self, means: Tensor, epoch: int) -> None:
        violation = means[2]
        if epoch % self.lambda_step == 0 and epoch > 1:
            factor = torch.where(violation > self.previous_violation, self.gamma, 1.0 / self.gamma)
            self.lambdas.copy_((self.lambdas * factor).clamp(self.lambda_min, self.lambda_max))
        self.previous_violation.copy_(violation)
