"""Penalty functions of the logit-distance constraint ``h <= 0`` (SPEC §1 ``mbls``, §2 CALS).

Each penalty gives ``P(h; lam, rho)`` and ``dP/dh`` elementwise (``value``, ``derivative``), and the
two entry points the fused loss uses on ``u = d - m`` with ``h = scale * u``: ``class_sum`` =
``sum_k P(h_k)`` per voxel and ``slope`` = ``dP/du``. All of them may overwrite their input (pass a
copy to keep it): the losses call them on a scratch buffer so that no further ``(M, C)`` tensor is
allocated, and PHR and the margin override them with fewer passes over memory. Both must stay finite
where ``u = -inf`` and ``slope`` must be 0 there (how the fused loss masks ignored voxels). ``lam`` and ``rho`` broadcast against
``h`` (class-wise multipliers are shaped ``(1, C, 1, ...)``); the margin penalty ignores them.

References: Birgin, Castillo & Martinez, "Numerical comparison of augmented Lagrangian algorithms
for nonconvex problems" (2005) for PHR, P2 and P3; Liu et al., CVPR 2023 (CALS).
"""

from __future__ import annotations

import torch
from torch import Tensor


class Penalty:
    """Base: ``class_sum`` and ``slope`` from ``value`` and ``derivative``."""

    def value(self, h: Tensor, lam: Tensor | None, rho: Tensor | None) -> Tensor:
        raise NotImplementedError

    def derivative(self, h: Tensor, lam: Tensor | None, rho: Tensor | None) -> Tensor:
        raise NotImplementedError

    def class_sum(self, u: Tensor, lam: Tensor | None, rho: Tensor | None, scale: float) -> Tensor:
        """``sum_k P(scale * u_k)`` over dim 1 of ``(B, C, *S)`` ``u``."""
        return self.value(u if scale == 1.0 else u.mul_(scale), lam, rho).sum(1)

    def slope(self, u: Tensor, lam: Tensor | None, rho: Tensor | None, scale: float) -> Tensor:
        """``d P(scale * u) / du`` elementwise."""
        if scale == 1.0:
            return self.derivative(u, lam, rho)
        return self.derivative(u.mul_(scale), lam, rho).mul_(scale)


class Margin(Penalty):
    """``P = relu(h)``, ``P' = [h > 0]`` (MbLS; the weight alpha is applied outside)."""

    def value(self, h: Tensor, lam: Tensor | None = None, rho: Tensor | None = None) -> Tensor:
        return h.clamp_min_(0)

    def derivative(self, h: Tensor, lam: Tensor | None = None, rho: Tensor | None = None) -> Tensor:
        return h.gt_(0)

    def class_sum(self, u: Tensor, lam: Tensor | None, rho: Tensor | None, scale: float) -> Tensor:
        total = u.clamp_min_(0).sum(1)
        return total if scale == 1.0 else total.mul_(scale)

    def slope(self, u: Tensor, lam: Tensor | None, rho: Tensor | None, scale: float) -> Tensor:
        mask = u.gt_(0)
        return mask if scale == 1.0 else mask.mul_(scale)


class PHR(Penalty):
    """Powell-Hestenes-Rockafellar: ``x = lam + rho*h``; ``P = (max(x,0)^2 - lam^2)/(2 rho)``, ``P' = max(x, 0)``."""

    def value(self, h: Tensor, lam: Tensor, rho: Tensor) -> Tensor:
        return h.mul_(rho).add_(lam).clamp_min_(0).square_().sub_(lam * lam).div_(2 * rho)

    def derivative(self, h: Tensor, lam: Tensor, rho: Tensor) -> Tensor:
        return h.mul_(rho).add_(lam).clamp_min_(0)

    def class_sum(self, u: Tensor, lam: Tensor, rho: Tensor, scale: float) -> Tensor:
        # max(x, 0)^2/(2 rho) = max(x / sqrt(2 rho), 0)^2 with x / sqrt(2 rho) = c lam + c rho scale u
        c = (2 * rho).rsqrt()
        torch.addcmul(c * lam, u, c * rho * scale, out=u)
        offset = (lam * lam / (2 * rho)).sum()
        return u.clamp_min_(0).square_().sum(1).sub_(offset)

    def slope(self, u: Tensor, lam: Tensor, rho: Tensor, scale: float) -> Tensor:
        # d/du = scale * max(lam + rho scale u, 0) = max(scale lam + rho scale^2 u, 0)
        return torch.addcmul(lam * scale, u, rho * (scale * scale), out=u).clamp_min_(0)


def _negative_branch(h: Tensor, lam: Tensor, rho: Tensor) -> tuple[Tensor, Tensor]:
    """P2/P3 for h < 0: ``P = lam h/(1 - rho h)``, ``P' = lam/(1 - rho h)^2`` (evaluated at min(h, 0)).

    ``P`` is written ``(lam/rho) (1/(1 - rho h) - 1)`` so that ``h = -inf`` gives the limit ``-lam/rho``.
    """
    inverse = (1 - rho * h.clamp_max(0)).reciprocal_()
    return (lam / rho) * (inverse - 1), lam * inverse.square()


class P2(Penalty):
    """h >= 0: ``P = lam h + lam rho h^2 + rho^2 h^3/6``, ``P' = lam + 2 lam rho h + rho^2 h^2/2``; h < 0 as P3."""

    def value(self, h: Tensor, lam: Tensor, rho: Tensor) -> Tensor:
        negative, _ = _negative_branch(h, lam, rho)
        positive = h * (lam + h * (lam * rho + h * (rho * rho / 6)))
        return torch.where(h >= 0, positive, negative)

    def derivative(self, h: Tensor, lam: Tensor, rho: Tensor) -> Tensor:
        _, negative = _negative_branch(h, lam, rho)
        positive = lam + h * (2 * lam * rho + h * (rho * rho / 2))
        return torch.where(h >= 0, positive, negative)


class P3(Penalty):
    """h >= 0: ``P = lam h + lam rho h^2``, ``P' = lam + 2 lam rho h``; h < 0: ``lam h/(1 - rho h)``, ``lam/(1 - rho h)^2``."""

    def value(self, h: Tensor, lam: Tensor, rho: Tensor) -> Tensor:
        negative, _ = _negative_branch(h, lam, rho)
        positive = h * lam * (1 + rho * h)
        return torch.where(h >= 0, positive, negative)

    def derivative(self, h: Tensor, lam: Tensor, rho: Tensor) -> Tensor:
        _, negative = _negative_branch(h, lam, rho)
        positive = lam * (1 + 2 * rho * h)
        return torch.where(h >= 0, positive, negative)


PENALTIES: dict[str, Penalty] = {"phr": PHR(), "p2": P2(), "p3": P3()}
"""The penalty-Lagrangian functions CALS can use, by name (SPEC §2)."""
