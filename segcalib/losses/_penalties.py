"""Penalty functions of the logit-distance constraint ``h <= 0`` (SPEC §1 ``mbls``, §2 CALS).

Each penalty gives the value ``P(h; lam, rho)`` and the derivative ``dP/dh`` elementwise. Both may
overwrite ``h`` (pass a copy to keep it): the losses call them on a scratch buffer so that no extra
``(M, C)`` tensor is allocated. ``lam`` and ``rho`` broadcast against ``h`` (class-wise multipliers
are shaped ``(1, C, 1, ...)``); the margin penalty ignores them.

References: Birgin, Castillo & Martinez, "Numerical comparison of augmented Lagrangian algorithms
for nonconvex problems" (2005) for PHR, P2 and P3; Liu et al., CVPR 2023 (CALS).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class Penalty(Protocol):
    def value(self, h: Tensor, lam: Tensor | None, rho: Tensor | None) -> Tensor: ...

    def derivative(self, h: Tensor, lam: Tensor | None, rho: Tensor | None) -> Tensor: ...


class Margin:
    """``P = relu(h)``, ``P' = [h > 0]`` (MbLS; the weight alpha is applied outside)."""

    @staticmethod
    def value(h: Tensor, lam: Tensor | None = None, rho: Tensor | None = None) -> Tensor:
        return h.clamp_min_(0)

    @staticmethod
    def derivative(h: Tensor, lam: Tensor | None = None, rho: Tensor | None = None) -> Tensor:
        return h.gt_(0)


class PHR:
    """Powell-Hestenes-Rockafellar: ``x = lam + rho*h``; ``P = (max(x,0)^2 - lam^2)/(2 rho)``, ``P' = max(x, 0)``."""

    @staticmethod
    def value(h: Tensor, lam: Tensor, rho: Tensor) -> Tensor:
        return h.mul_(rho).add_(lam).clamp_min_(0).square_().sub_(lam * lam).div_(2 * rho)

    @staticmethod
    def derivative(h: Tensor, lam: Tensor, rho: Tensor) -> Tensor:
        return h.mul_(rho).add_(lam).clamp_min_(0)


def _negative_branch(h: Tensor, lam: Tensor, rho: Tensor) -> tuple[Tensor, Tensor]:
    """P2/P3 for h < 0: ``P = lam h/(1 - rho h)``, ``P' = lam/(1 - rho h)^2`` (evaluated at min(h, 0))."""
    hn = h.clamp_max(0)
    denominator = 1 - rho * hn
    return lam * hn / denominator, lam / denominator.square()


class P2:
    """h >= 0: ``P = lam h + lam rho h^2 + rho^2 h^3/6``, ``P' = lam + 2 lam rho h + rho^2 h^2/2``; h < 0 as P3."""

    @staticmethod
    def value(h: Tensor, lam: Tensor, rho: Tensor) -> Tensor:
        negative, _ = _negative_branch(h, lam, rho)
        positive = h * (lam + h * (lam * rho + h * (rho * rho / 6)))
        return torch.where(h >= 0, positive, negative)

    @staticmethod
    def derivative(h: Tensor, lam: Tensor, rho: Tensor) -> Tensor:
        _, negative = _negative_branch(h, lam, rho)
        positive = lam + h * (2 * lam * rho + h * (rho * rho / 2))
        return torch.where(h >= 0, positive, negative)


class P3:
    """h >= 0: ``P = lam h + lam rho h^2``, ``P' = lam + 2 lam rho h``; h < 0: ``lam h/(1 - rho h)``, ``lam/(1 - rho h)^2``."""

    @staticmethod
    def value(h: Tensor, lam: Tensor, rho: Tensor) -> Tensor:
        negative, _ = _negative_branch(h, lam, rho)
        positive = h * lam * (1 + rho * h)
        return torch.where(h >= 0, positive, negative)

    @staticmethod
    def derivative(h: Tensor, lam: Tensor, rho: Tensor) -> Tensor:
        _, negative = _negative_branch(h, lam, rho)
        positive = lam * (1 + 2 * rho * h)
        return torch.where(h >= 0, positive, negative)


PENALTIES: dict[str, Penalty] = {"phr": PHR(), "p2": P2(), "p3": P3()}
"""The penalty-Lagrangian functions CALS can use, by name (SPEC §2)."""
