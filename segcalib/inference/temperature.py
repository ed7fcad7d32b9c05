"""Post-hoc temperature scaling (Guo et al., ICML 2017): ``p = softmax(z / T)``.

T > 0 minimises the NLL of validation voxels; it is fitted with LBFGS on ``log T`` over a
fixed-size, seeded sample of voxels, so fitting never needs every voxel in memory. Which voxels
are sampled is a choice (``all``, ``foreground`` or ``boundary`` of the ground truth): a fit
dominated by background voxels can make the foreground less calibrated.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from segcalib.spatial.regions import ALL, check_region
from segcalib.utils.tensors import as_label_map, flatten_classes

log = logging.getLogger("segcalib")
DEFAULT_MAX_VOXELS = 2_000_000
T_BOUNDS = (1e-2, 1e2)  # beyond these, float32 softmax loses the argmax to rounding


@dataclass(frozen=True)
class TemperatureRequest:
    """What the user asked for, parsed once at the boundary: no scaling, a given ``value``, or a
    fit on the validation voxels of ``region`` (a name from :mod:`segcalib.spatial.regions`)."""

    mode: str = "none"  # "none", "value" or "fit"
    value: float = 1.0
    region: str = ALL

    @classmethod
    def parse(cls, text: str | float | None, region: str = ALL) -> TemperatureRequest:
        """``none``, ``fit`` or a positive number; ValueError naming the value otherwise."""
        check_region(region)
        if text is None or text == "none":
            return cls()
        if text == "fit":
            return cls("fit", region=region)
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise ValueError(f"{text!r} is not none, fit or a positive number") from None
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{text!r} must be a positive number")
        return cls("value", value=value)

    def record(self) -> dict[str, object]:
        """The request as plain data (export.json): a rerun with the same request reuses T."""
        if self.mode == "fit":
            return {"mode": "fit", "region": self.region}
        if self.mode == "value":
            return {"mode": "value", "value": self.value}
        return {"mode": "none"}


@dataclass
class VoxelSample:
    """A seeded uniform sample of at most ``max_voxels`` voxels, filled volume by volume.

    Each volume offers its (region) voxels; reservoir sampling with random keys keeps a uniform
    sample of everything offered so far, in memory bounded by ``max_voxels``.
    """

    max_voxels: int = DEFAULT_MAX_VOXELS
    seed: int = 0
    logits: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    offered: int = 0
    _generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)

    def add(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Offer the voxels of ``logits (B, C, *S)`` / ``target (B, *S)`` where ``mask (B, *S)``."""
        z = flatten_classes(logits.detach().float()).cpu()
        y = as_label_map(target, logits).reshape(-1).cpu()
        if mask is not None:
            keep = mask.reshape(-1).cpu().bool()
            z, y = z[keep], y[keep]
        if z.shape[0] == 0:
            return
        self.offered += z.shape[0]
        keys = torch.rand(z.shape[0], generator=self._generator)
        if self.logits is not None:
            z = torch.cat([self.logits, z])
            y = torch.cat([self.targets, y])
            keys = torch.cat([self.keys, keys])
        if z.shape[0] > self.max_voxels:
            top = torch.topk(keys, self.max_voxels, sorted=False).indices
            z, y, keys = z[top], y[top], keys[top]
        self.logits, self.targets, self.keys = z, y, keys

    def __len__(self) -> int:
        return 0 if self.logits is None else int(self.logits.shape[0])


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The T minimising mean NLL of ``softmax(logits / T)`` for ``logits (N, C)``, ``targets (N,)``."""
    if logits.shape[0] == 0:
        raise ValueError("no voxels to fit a temperature on")
    z = logits.double()
    y = targets.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimiser.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature fit diverged (T = {t})")
    low, high = T_BOUNDS
    if not low <= t <= high:
        clamped = min(max(t, low), high)
        log.warning(
            "fitted temperature %.4g is outside [%g, %g]; using %g (the predictions on these voxels carry "
            "little information: is the model trained?)", t, low, high, clamped
        )
        t = clamped
    return t


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Calibrated probabilities ``softmax(logits / T)`` over the class axis 1 (``logits`` untouched)."""
    return apply_temperature_(logits.float().clone(), temperature, dim=1)


def apply_temperature_(logits: torch.Tensor, temperature: float, dim: int = 1) -> torch.Tensor:
    """In-place ``softmax(logits / T)`` over ``dim`` (float32 logits): no second volume in memory.

    Stable for every finite input and every ``T`` that is a normal float32: a quotient beyond the
    float32 range is held at its largest finite value before the maximum is subtracted, so an
    extreme (tiny) temperature gives a one-hot map, never ``inf - inf = NaN``."""
    logits.div_(float(temperature))
    if logits.dtype == torch.float32:
        big = torch.finfo(torch.float32).max
        torch.nan_to_num_(logits, nan=float("nan"), posinf=big, neginf=-big)
    logits.sub_(logits.amax(dim=dim, keepdim=True))
    logits.exp_()
    logits.div_(logits.sum(dim=dim, keepdim=True))
    return logits
