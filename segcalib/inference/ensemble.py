"""Streaming ensembles in probability space: runs, folds, test-time flips, MC-dropout passes.

Each member's probabilities ``p_m`` (``(B, C, *spatial)``, already calibrated by its own
temperature or calibrator) are added one at a time; only running sums are kept, never the members:
``Σ w_m p_m`` and ``Σ w_m Σ_c p_mc log p_mc`` (and ``Σ w_m p_m²`` when the variance is asked for).
With weights normalised to ``w_m / Σ w``, :meth:`ProbabilityEnsemble.result` gives, in nats:

- mean probabilities ``E[p] = Σ w p / Σ w``;
- total predictive entropy ``H[E p] = -Σ_c E[p]_c log E[p]_c``;
- expected entropy ``E[H[p]]`` (aleatoric part);
- mutual information ``H[E p] - E[H[p]] ≥ 0`` (epistemic part, the BALD score; rounding
  negatives are set to 0, so ``entropy = expected_entropy + mutual_info`` up to them);
- optionally the per-class (weighted, population) variance ``E[p²] - E[p]²`` clamped at 0.

``0 log 0 = 0`` throughout. Reference: Depeweg et al., "Decomposition of Uncertainty in Bayesian
Deep Learning for Efficient and Risk-sensitive Learning", ICML 2018; Lakshminarayanan et al.,
"Simple and Scalable Predictive Uncertainty Estimation using Deep Ensembles", NeurIPS 2017.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class EnsembleResult:
    """What an ensemble says about each voxel (dtype of the running sums).

    Attributes:
        mean: mean probabilities ``(B, C, *spatial)``.
        entropy: total predictive entropy ``H[E p]`` ``(B, *spatial)``, nats.
        expected_entropy: ``E[H[p]]`` ``(B, *spatial)``, nats (aleatoric).
        mutual_info: ``H[E p] - E[H[p]]`` ``(B, *spatial)``, nats, ``>= 0`` (epistemic).
        variance: per-class variance of the members ``(B, C, *spatial)``, or ``None``.
        members: how many members were added.
    """

    mean: torch.Tensor
    entropy: torch.Tensor
    expected_entropy: torch.Tensor
    mutual_info: torch.Tensor
    variance: torch.Tensor | None
    members: int


def entropy(probs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Shannon entropy ``-Σ p log p`` in nats along ``dim`` (``0 log 0 = 0``)."""
    return -torch.xlogy(probs, probs).sum(dim)


class ProbabilityEnsemble:
    """Combine member probabilities one at a time in bounded memory.

    Memory: the running sums (``C + 1`` values per voxel, ``2C + 1`` with ``variance=True``) in
    ``dtype``, plus one class slice of the member being added. float64 (the default) keeps
    ``entropy = expected_entropy + mutual_info`` to ~1e-15; float32 halves the memory of a
    large volume and keeps it to ~1e-6.

    Args:
        variance: also keep ``Σ w p²`` for the per-class variance.
        dtype: dtype of the running sums (``torch.float64`` or ``torch.float32``).
    """

    def __init__(self, variance: bool = False, dtype: torch.dtype = torch.float64) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.variance = variance
        self.dtype = dtype
        self.members = 0
        self.total_weight = 0.0
        self._sum_p: torch.Tensor | None = None
        self._sum_p2: torch.Tensor | None = None
        self._sum_plogp: torch.Tensor | None = None

    def add(self, probs: torch.Tensor, weight: float = 1.0) -> None:
        """Add one member's probabilities ``(B, C, *spatial)`` (they sum to 1 over C) with ``weight > 0``."""
        if not torch.is_tensor(probs) or not probs.is_floating_point() or probs.dim() < 3:
            raise ValueError("a member's probabilities must be a floating point tensor (B, C, *spatial)")
        weight = float(weight)
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"a member's weight must be finite and > 0, got {weight!r}")
        if self._sum_p is None:
            self._sum_p = torch.zeros(probs.shape, dtype=self.dtype, device=probs.device)
            self._sum_plogp = torch.zeros(probs.shape[:1] + probs.shape[2:], dtype=self.dtype, device=probs.device)
            if self.variance:
                self._sum_p2 = torch.zeros_like(self._sum_p)
        elif probs.shape != self._sum_p.shape:
            raise ValueError(
                f"member {self.members + 1} has shape {tuple(probs.shape)}, "
                f"the ensemble so far {tuple(self._sum_p.shape)}"
            )
        probs = probs.to(self._sum_p.device)
        for c in range(probs.shape[1]):  # one class at a time: temporaries of (B, *spatial) only
            p = probs[:, c].to(self.dtype)
            self._sum_p[:, c].add_(p, alpha=weight)
            self._sum_plogp.add_(torch.xlogy(p, p), alpha=weight)
            if self._sum_p2 is not None:
                self._sum_p2[:, c].addcmul_(p, p, value=weight)
        self.members += 1
        self.total_weight += weight

    def result(self) -> EnsembleResult:
        """Mean probabilities and the entropy decomposition of the members added so far."""
        if self._sum_p is None:
            raise ValueError("the ensemble has no members yet")
        mean = self._sum_p / self.total_weight
        total = entropy(mean)
        expected = self._sum_plogp / -self.total_weight
        mutual_info = (total - expected).clamp_(min=0.0)
        variance = None
        if self._sum_p2 is not None:
            variance = (self._sum_p2 / self.total_weight).sub_(mean * mean).clamp_(min=0.0)
        return EnsembleResult(mean, total, expected, mutual_info, variance, self.members)
