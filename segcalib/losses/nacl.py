"""Neighbour-aware calibration loss (NACL)."""

from __future__ import annotations

import torch
from torch import Tensor

from segcalib.losses._checks import check_choice, check_float, check_odd
from segcalib.losses._filters import erf_gaussian_1d, separable_filter
from segcalib.losses._inputs import LossInputs
from segcalib.losses.base import CalibrationLoss
from segcalib.losses.registry import register_loss


@register_loss("nacl")
class NeighbourAwareLoss(CalibrationLoss):
    """``CE + alpha * mean_{i,c} |tau_ic - z_ic|`` on raw logits (``distance="l2"``: squared), where
    ``tau`` = the class proportions in the window around each voxel (SPEC §1 ``nacl``, alpha = 0.1,
    k = 3). 2D and 3D.

    ``kernel_ops="mean"``: ``tau`` = one-hot filtered by ``ones / k^d``; ``"gaussian"``: by MONAI's
    Gaussian filter (erf taps, ``sigma``, truncated at 4 sigma; ``kernel_size`` is unused). Borders:
    zero padding, as MONAI's ``NACLLoss``: outside voxels count as no class, so at the image border
    ``tau`` sums to less than 1 (e.g. 4/9 at a 2D corner with k = 3). Ignored voxels are treated like
    outside voxels in ``tau`` and drop out of both means.

    Murugesan et al., "Trust your neighbours", MICCAI 2023. Components: ``ce``, ``penalty`` (the
    mean distance, before alpha).
    """

    def __init__(
        self,
        *,
        kernel_size: int = 3,
        alpha: float = 0.1,
        kernel_ops: str = "mean",
        distance: str = "l1",
        sigma: float = 1.0,
        ignore_index: int = -100,
    ) -> None:
        super().__init__(ignore_index=ignore_index)
        self.kernel_size = check_odd(self.name, "kernel_size", kernel_size)
        self.alpha = check_float(self.name, "alpha", alpha, low=0.0)
        self.kernel_ops = check_choice(self.name, "kernel_ops", kernel_ops, ("mean", "gaussian"))
        self.distance = check_choice(self.name, "distance", distance, ("l1", "l2"))
        self.sigma = check_float(self.name, "sigma", sigma, low=0.0, low_open=True)
        if self.kernel_ops == "mean":
            self._kernel_1d = torch.full((self.kernel_size,), 1.0 / self.kernel_size, dtype=torch.float64)
        else:
            self._kernel_1d = erf_gaussian_1d(self.sigma)

    def neighbour_proportions(self, inputs: LossInputs) -> Tensor:
        """``tau``: ``(B, C, *spatial)`` filtered one-hot target (no gradient)."""
        if inputs.spatial_dims not in (2, 3):
            raise ValueError(f"nacl supports 2D and 3D inputs, got {inputs.spatial_dims} spatial dimensions")
        with torch.no_grad():
            return separable_filter(inputs.one_hot(), self._kernel_1d)

    def compute(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        ce = inputs.cross_entropy()
        gap = self.neighbour_proportions(inputs) - inputs.logits
        gap = gap.abs() if self.distance == "l1" else gap.square()
        penalty = inputs.class_mean(gap)
        return ce + self.alpha * penalty, {"ce": ce, "penalty": penalty}

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, alpha={self.alpha}, kernel_ops={self.kernel_ops!r}, "
            f"distance={self.distance!r}, {super().extra_repr()}"
        )
