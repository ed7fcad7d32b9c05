"""Spatially varying label smoothing (SVLS)."""

from __future__ import annotations

import torch
from torch import Tensor

from segcalib.losses._checks import check_float, check_odd
from segcalib.losses._filters import depthwise_filter, svls_kernel
from segcalib.losses._inputs import LossInputs
from segcalib.losses.base import CalibrationLoss
from segcalib.losses.registry import register_loss


@register_loss("svls")
class SpatiallyVaryingLabelSmoothingLoss(CalibrationLoss):
    """``mean_i -sum_c s_ic log p_ic`` with soft targets ``s`` = the one-hot target filtered
    channel-wise by the SVLS kernel (SPEC §1 ``svls``: Gaussian sigma = 1, k = 3, centre weight =
    sum of the others, so 0.5 after normalisation). 2D and 3D.

    Borders: replicate padding (a border voxel's missing neighbours take the label of the nearest
    voxel in the image). Ignored voxels are left out of the neighbourhood: ``s`` is renormalised by
    the kernel weight of the valid neighbours, so it still sums to 1, and they drop out of the mean.

    Islam & Glocker, "Spatially Varying Label Smoothing", IPMI 2021. Components: ``svls``.
    """

    def __init__(self, *, kernel_size: int = 3, sigma: float = 1.0, ignore_index: int = -100) -> None:
        super().__init__(ignore_index=ignore_index)
        self.kernel_size = check_odd(self.name, "kernel_size", kernel_size, low=3)
        self.sigma = check_float(self.name, "sigma", sigma, low=0.0, low_open=True)
        self._kernels: dict[int, Tensor] = {}

    def kernel(self, spatial_dims: int) -> Tensor:
        """The float64 SVLS kernel for 2D or 3D (cached)."""
        if spatial_dims not in (2, 3):
            raise ValueError(f"svls supports 2D and 3D inputs, got {spatial_dims} spatial dimensions")
        if spatial_dims not in self._kernels:
            self._kernels[spatial_dims] = svls_kernel(spatial_dims, self.kernel_size, self.sigma)
        return self._kernels[spatial_dims]

    def soft_targets(self, inputs: LossInputs) -> Tensor:
        """``(B, C, *spatial)`` soft targets, summing to 1 on valid voxels."""
        kernel = self.kernel(inputs.spatial_dims)
        with torch.no_grad():
            smoothed = depthwise_filter(inputs.one_hot(), kernel, "replicate")
            valid_weight = depthwise_filter(inputs.weight.unsqueeze(1), kernel, "replicate")
            return smoothed / valid_weight.clamp_min(torch.finfo(smoothed.dtype).tiny)

    def compute(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        soft = self.soft_targets(inputs)
        loss = -inputs.mean((soft * inputs.logits.log_softmax(1)).sum(1))
        return loss, {"svls": loss}

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, sigma={self.sigma}, {super().extra_repr()}"
