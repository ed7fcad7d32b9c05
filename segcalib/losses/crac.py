"""Class- and region-adaptive constraints (CRaC): multipliers per class and per region, by augmented Lagrangian."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from segcalib.errors import ConfigError
from segcalib.losses._checks import check_choice, check_float, check_int, check_odd, set_multiplier_schedule
from segcalib.losses._constrained_ce import ConstrainedCrossEntropy, ConstraintTerms
from segcalib.losses._filters import label_codes, one_hot_and_window_counts, window_counts
from segcalib.losses._inputs import LossInputs
from segcalib.losses._margin_ce import per_class
from segcalib.losses._penalties import PENALTIES, PHR
from segcalib.losses.base import AdaptiveLoss
from segcalib.losses.registry import register_loss
from segcalib.spatial.regions import BOUNDARY, DEFAULT_BOUNDARY_MM, RegionContext, region_mask
from segcalib.utils.distributed import all_reduce_sum
from segcalib.utils.tensors import HALF_DTYPES

REGIONS = (BOUNDARY, "interior")
"""Row order of ``lambdas`` / ``rhos``: the boundary band, then every other voxel."""


def neighbour_proportions(
    labels: Tensor, valid: Tensor, num_classes: int, kernel_size: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``tau``: ``(B, C, *spatial)`` share of each class in the ``k^d`` window around every voxel.

    As the reference code: voxels outside the image count as background (class 0), ignored voxels
    as no class; the zero-padded box means (``count_include_pad``) of the one-hot labels.
    """
    counts = window_counts(labels, valid, num_classes, kernel_size)
    work = torch.float32 if dtype in HALF_DTYPES else dtype  # counts up to k^d: exact in float32
    return counts.to(work).div_(kernel_size ** (labels.dim() - 1)).to(dtype)


@register_loss("crac")
class ClassRegionAdaptiveLoss(AdaptiveLoss):
    """``CE + mean_{i, r, k} P(h_ik [i in r]; lambda_rk, rho_rk)`` over valid voxels i, the two
    regions r (boundary band, interior) and the C classes k, with the L1 constraints

    - boundary voxels: ``h_ik = |tau_ik - z_ik|``, ``tau`` the class shares in the ``k^d`` window
      (NACL's target);
    - interior voxels: ``h_ik = |m * tau_ik - z_ik|`` (``tau`` is the one-hot label where the window is uniform);

    and P the PHR / P2 / P3 penalty-Lagrangian of CALS (P(0) = 0, so the entries of the other region
    add 0, but count in the mean over ``2C`` entries, as in the reference code). The boundary region
    (``region="band"``) is segcalib's metric band: voxels within ``boundary_mm`` (with ``spacing``,
    mm per axis; None: 1 mm) of an edge voxel of any ground-truth foreground class
    (``segcalib.spatial``); ``region="window"`` is the paper's: voxels whose ``k^d`` window holds more
    than one label (the image's outside counting as background, an ignored voxel as another label).

    Outer update (``accumulate(val_logits, val_target)`` per validation batch, ``step()`` once per
    epoch), N the number of valid validation voxels, N_r those in region r:

    - every ``lambda_step`` epochs: ``lambda_rk <- clamp((sum_{i in r} clamp(P'(h_ik)) + (N - N_r)
      clamp(P'(0))) / N, lmin, lmax)`` with clamps to [lmin, lmax] -- the reference's mean over all
      voxels of its region-masked constraints, where a voxel outside r has h = 0 (P'(0) = lambda for PHR);
    - ``c_rk = sum_{i in r} h_ik / N``; every ``rho_step`` epochs once a previous c exists,
      ``rho_rk <- gamma rho_rk`` where ``c_rk > tau max(c_prev_rk, 0)``, clamped to [rho_init, rho_max];
      ``c_prev <- c`` every epoch; lambda is updated with the old rho, then rho.

    Sums are all-reduced before dividing under ``torch.distributed``. State (``lambdas`` and
    ``rhos`` ``(2, C)``, rows in :data:`REGIONS` order; ``previous_constraint``; ``epoch``) is in buffers.
    Murugesan et al., "Class and Region-Adaptive Constraints for Network Calibration", MICCAI 2024
    (code Bala93/CRac). Components: ``ce``, ``penalty``.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        margin: float = 5.0,
        penalty: str = "phr",
        lambda_min: float = 1e-6,
        lambda_max: float = 1e6,
        lambda_step: int = 1,
        rho_init: float = 0.1,
        rho_max: float = 10.0,
        rho_step: int = 10,
        gamma: float = 1.2,
        tau: float = 0.9,
        kernel_size: int = 3,
        region: str = "band",
        boundary_mm: float = DEFAULT_BOUNDARY_MM,
        spacing: Sequence[float] | None = None,
        ignore_index: int = -100,
    ) -> None:
        super().__init__(ignore_index=ignore_index)
        name = self.name
        self.num_classes = check_int(name, "num_classes", num_classes, low=1)
        self.margin = check_float(name, "margin", margin, low=0.0)
        set_multiplier_schedule(
            self, name, penalty=penalty, lambda_min=lambda_min, lambda_max=lambda_max, lambda_step=lambda_step,
            rho_init=rho_init, rho_max=rho_max, rho_step=rho_step, gamma=gamma, tau=tau, penalties=tuple(PENALTIES),
        )
        self.kernel_size = check_odd(name, "kernel_size", kernel_size)
        self.region = check_choice(name, "region", region, ("band", "window"))
        self.boundary_mm = check_float(name, "boundary_mm", boundary_mm, low=0.0)
        self.spacing = None if spacing is None else self._check_spacing(spacing)
        self._penalty = PENALTIES[self.penalty]

        shape = (len(REGIONS), self.num_classes)
        self.register_buffer("lambdas", torch.full(shape, self.lambda_min))
        self.register_buffer("rhos", torch.full(shape, self.rho_init))
        self.register_buffer("previous_constraint", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.int64))
        # Per-epoch sums: [0] clamped P'(h) over each region's voxels, [1] h over them; voxel counts.
        self.register_buffer("_sums", torch.zeros(2, *shape, dtype=torch.float64), persistent=False)
        self.register_buffer("_region_count", torch.zeros(len(REGIONS), dtype=torch.float64), persistent=False)
        self.register_buffer("_count", torch.zeros((), dtype=torch.float64), persistent=False)

    def _check_spacing(self, spacing: object) -> tuple[float, ...]:
        if isinstance(spacing, (str, bytes)) or not isinstance(spacing, Sequence) or len(spacing) not in (2, 3):
            raise ConfigError(
                f"loss '{self.name}': parameter 'spacing' must be 2 or 3 positive numbers (mm per axis) or null, "
                f"got {spacing!r}"
            )
        return tuple(check_float(self.name, "spacing", s, low=0.0, low_open=True) for s in spacing)

    # -- constraints ---------------------------------------------------------------------------

    def _check_classes(self, logits: Tensor) -> None:
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"{self.name} was built for {self.num_classes} classes, got logits {tuple(logits.shape)}")

    def _codes(self, inputs: LossInputs, masked: bool = True) -> Tensor:
        """:func:`label_codes` of the target: uint8 labels, ``C`` on ignored voxels (``masked=False``: none is)."""
        return label_codes(inputs.target, inputs.valid if masked else None, self.num_classes)

    def regions(self, inputs: LossInputs, codes: Tensor | None = None, counts: Tensor | None = None, *,
                all_valid: bool = False) -> Tensor:
        """Boolean ``(B, *spatial)``: True in the boundary region (from the ground truth; ignored
        voxels excluded): the band (``region="band"``) or the mixed windows (``region="window"``).
        ``codes`` / ``counts``: :meth:`_codes` and the window counts when the caller has them;
        ``all_valid``: the caller knows that no voxel is ignored (no mask to apply)."""
        dims = inputs.spatial_dims
        if dims not in (2, 3):
            raise ValueError(f"{self.name} supports 2D and 3D inputs, got {dims} spatial dimensions")
        with torch.no_grad():
            codes = self._codes(inputs) if codes is None else codes
            if self.region == "window":  # the window holds another label, the outside or an ignored voxel
                if counts is None:
                    counts = one_hot_and_window_counts(codes, self.num_classes, self.kernel_size)[1]
                mixed = counts.amax(1) < self.kernel_size**dims
                return mixed if all_valid else mixed & inputs.valid
        spacing = self.spacing or (1.0,) * dims
        if len(spacing) != dims:
            raise ValueError(f"{self.name}: spacing {spacing} has {len(spacing)} values for {dims}D inputs")
        context = RegionContext(  # the codes: ignored voxels hold C, a label of no class
            target=codes,
            spacing=[spacing] * codes.shape[0],
            num_classes=self.num_classes,
            boundary_mm=self.boundary_mm,
            ignore_index=self.num_classes,
        )
        band = region_mask(BOUNDARY, context)
        return band if all_valid else band & inputs.valid

    @torch.no_grad()
    def terms(self, inputs: LossInputs) -> tuple[ConstraintTerms, Tensor]:
        """Everything the loss needs from the labels, voxels flattened (see :class:`ConstraintTerms`),
        and the ``(2C + 1, 2)`` table of region values: lambda_k, rho_k and the targets' scale
        (``1/k^d`` on the boundary, ``m/k^d`` elsewhere: the target is ``tau``, resp. ``m tau``),
        columns boundary, interior."""
        self._check_classes(inputs.logits)
        masked = inputs.valid.numel() > 0 and not bool(inputs.valid.view(torch.uint8).amin())  # byte min: fast, unlike all()
        valid_count = int(inputs.valid.sum()) if masked else inputs.valid.numel()
        codes = self._codes(inputs, masked)
        onehot, counts = one_hot_and_window_counts(codes, self.num_classes, self.kernel_size)
        boundary = self.regions(inputs, codes, counts, all_valid=not masked)
        batch = inputs.logits.shape[0]
        size = self.kernel_size**inputs.spatial_dims
        scale = torch.tensor([[1 / size, self.margin / size]], dtype=torch.float64, device=self.lambdas.device)
        table = torch.cat([self.lambdas.t().double(), self.rhos.t().double(), scale])
        terms = ConstraintTerms(
            onehot=onehot.reshape(batch, self.num_classes, -1),
            boundary=boundary.reshape(batch, 1, -1).view(torch.uint8),
            counts=counts.reshape(batch, self.num_classes, -1),
            count=float(max(valid_count, 1)),
            valid=inputs.valid.reshape(batch, 1, -1).to(inputs.logits.dtype) if masked else None,
        )
        return terms, table.to(device=boundary.device)

    def constraints(self, inputs: LossInputs) -> tuple[Tensor, Tensor]:
        """``h`` ``(B, C, *spatial)`` (see the class docstring; no gradient) and the boundary mask ``(B, *spatial)``."""
        terms, table = self.terms(inputs)
        scale = table[-1].to(inputs.logits)
        goal_scale = terms.boundary * (scale[0] - scale[1]) + scale[1]
        logits = inputs.logits.detach().reshape(terms.counts.shape)
        h = torch.addcmul(logits, terms.counts, goal_scale, value=-1).abs_()
        return h.reshape(inputs.logits.shape), terms.boundary.reshape(inputs.valid.shape) > 0

    def _fast_penalty(self) -> bool:
        """Whether the penalty is PHR with every lambda >= 0 and rho > 0 (so ``P = lam h + rho h^2 / 2``).

        Checked again only when a multiplier buffer was replaced or changed in place (its tensor
        version counter moved: ``step()``, ``load_state_dict()``, a direct ``copy_``), so that the
        check's host sync on an accelerator happens once per epoch, not once per batch."""
        lambdas, rhos = self.lambdas, self.rhos
        known = getattr(self, "_linear_quadratic_seen", None)  # the tensors themselves: their ids are not reused
        try:
            versions = (lambdas._version, rhos._version)
        except RuntimeError:  # inference tensors (made under torch.inference_mode) keep no version: check each call
            known, versions = None, (-1, -1)
        if known is None or known[:2] != versions or known[2] is not lambdas or known[3] is not rhos:
            valid = bool((lambdas >= 0).all() & (rhos > 0).all())
            self._linear_quadratic = isinstance(self._penalty, PHR) and valid
            self._linear_quadratic_seen = (*versions, lambdas, rhos)
        return self._linear_quadratic

    def compute(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        terms, table = self.terms(inputs)
        norm = terms.count * 2 * self.num_classes  # the mean over valid voxels x 2C entries
        logits = inputs.logits.reshape(terms.counts.shape)
        fast = self._fast_penalty()
        total, ce, penalty = ConstrainedCrossEntropy.apply(logits, terms, table, self._penalty, norm, fast)
        return total, {"ce": ce, "penalty": penalty}

    # -- outer update --------------------------------------------------------------------------

    @torch.no_grad()
    def accumulate(self, val_logits: Tensor, val_target: Tensor | None = None) -> None:
        """Add one validation batch (logits ``(B, C, *spatial)``, labels ``(B, *spatial)``) to this epoch's sums."""
        if val_target is None:
            raise ValueError(f"{self.name}.accumulate needs the validation labels (regions and targets come from them)")
        logits = val_logits.float() if val_logits.dtype in HALF_DTYPES else val_logits
        with torch.autocast(device_type=logits.device.type, enabled=False):
            inputs = LossInputs(logits, val_target, self.ignore_index)
            h, boundary = self.constraints(inputs)
            dims = (0, *range(2, h.dim()))
            for r, mask in enumerate((boundary, inputs.valid & ~boundary)):
                mask = mask.unsqueeze(1)
                lam, rho = per_class(self.lambdas[r], h), per_class(self.rhos[r], h)
                slope = self._penalty.derivative(h.clone(), lam, rho).clamp_(self.lambda_min, self.lambda_max)
                self._sums[0, r] += torch.where(mask, slope, 0.0).sum(dims, dtype=torch.float64).to(self._sums.device)
                self._sums[1, r] += torch.where(mask, h, 0.0).sum(dims, dtype=torch.float64).to(self._sums.device)
                self._region_count[r] += float(mask.sum())
        self._count += float(inputs.valid.sum())

    @torch.no_grad()
    def step(self) -> None:
        """End of epoch: update lambda (then rho) of every region and class, reset the sums."""
        regions, classes = len(REGIONS), self.num_classes
        packed = all_reduce_sum(torch.cat([self._sums.flatten(), self._region_count, self._count.reshape(1)]))
        count = float(packed[-1])
        if count == 0:
            raise RuntimeError(f"{self.name}.step() needs accumulate() on at least one validation voxel first")
        sums = packed[: 2 * regions * classes].reshape(2, regions, classes)
        outside = (count - packed[2 * regions * classes : -1]).reshape(regions, 1)
        lam64, rho64 = self.lambdas.double(), self.rhos.double()
        slope_at_zero = self._penalty.derivative(torch.zeros_like(lam64), lam64, rho64)
        slope_at_zero = slope_at_zero.clamp(self.lambda_min, self.lambda_max)
        mean_slope = (sums[0] + outside * slope_at_zero) / count
        constraint = sums[1] / count
        epoch = int(self.epoch) + 1
        if epoch % self.lambda_step == 0:
            self.lambdas.copy_(mean_slope.clamp(self.lambda_min, self.lambda_max))
        if self.rho_step > 0 and epoch % self.rho_step == 0 and epoch > 1:
            grow = constraint > self.tau * self.previous_constraint.clamp_min(0)
            rhos = torch.where(grow, self.rhos * self.gamma, self.rhos)
            self.rhos.copy_(rhos.clamp(self.rho_init, self.rho_max))
        self.previous_constraint.copy_(constraint)
        self.epoch.fill_(epoch)
        self._sums.zero_()
        self._region_count.zero_()
        self._count.zero_()

    def logged_state(self) -> dict[str, float]:
        """``lambda_<region>_<k>`` and ``rho_<region>_<k>`` for both regions and every class."""
        row: dict[str, float] = {}
        for name, values in (("lambda", self.lambdas), ("rho", self.rhos)):
            for r, region in enumerate(REGIONS):
                row.update({f"{name}_{region}_{k}": float(v) for k, v in enumerate(values[r].tolist())})
        return row

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, margin={self.margin}, penalty={self.penalty!r}, "
            f"region={self.region!r}, boundary_mm={self.boundary_mm}, spacing={self.spacing}, {super().extra_repr()}"
        )

