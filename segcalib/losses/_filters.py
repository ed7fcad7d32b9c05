"""Spatial kernels and depthwise filtering of ``(B, C, *spatial)`` maps (2D and 3D), for SVLS and NACL."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def svls_kernel(spatial_dims: int, size: int, sigma: float) -> Tensor:
    """SVLS kernel (Islam & Glocker, IPMI 2021): a sampled isotropic Gaussian ``exp(-|x|^2 / 2 sigma^2)``
    on a ``size^d`` grid whose centre weight is replaced by the sum of the other weights, then
    normalised to sum 1, so the centre weighs exactly 0.5. float64, shape ``(size,) * spatial_dims``.
    """
    if size < 3 or size % 2 == 0:
        raise ValueError(f"SVLS needs an odd kernel size >= 3, got {size}")
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    grids = torch.meshgrid(*([offsets] * spatial_dims), indexing="ij")
    squared = sum(g.square() for g in grids)
    kernel = torch.exp(-squared / (2 * sigma**2))
    centre = (size // 2,) * spatial_dims
    kernel[centre] = 0.0
    kernel[centre] = kernel.sum()
    return kernel / kernel.sum()


def erf_gaussian_1d(sigma: float, truncated: float = 4.0) -> Tensor:
    """Discrete Gaussian whose taps integrate the normal density over each unit cell, truncated at
    ``truncated * sigma`` and not renormalised (the "erf" kernel of MONAI's ``GaussianFilter``). float64."""
    tail = int(max(sigma * truncated, 0.5) + 0.5)
    x = torch.arange(-tail, tail + 1, dtype=torch.float64)
    scale = 1.0 / (math.sqrt(2.0) * sigma)
    return (0.5 * (torch.erf(scale * (x + 0.5)) - torch.erf(scale * (x - 0.5)))).clamp_min(0)


def depthwise_filter(x: Tensor, kernel: Tensor, padding_mode: str) -> Tensor:
    """Filter each channel of ``x`` ``(B, C, *spatial)`` with ``kernel`` ``(k,) * d`` (odd k), output same shape.

    ``padding_mode``: ``"replicate"`` (border voxels extended) or ``"zeros"`` (outside counts as 0).
    Correlation, not convolution: the kernels used here are symmetric, so both agree.
    """
    channels, dims = x.shape[1], x.dim() - 2
    weight = kernel.to(x).expand(channels, 1, *kernel.shape)
    radius = [k // 2 for k in kernel.shape]
    if padding_mode == "replicate":
        pads = [r for r in reversed(radius) for _ in range(2)]
        return _CONV[dims](F.pad(x, pads, mode="replicate"), weight, groups=channels)
    if padding_mode == "zeros":
        return _CONV[dims](x, weight, padding=radius, groups=channels)
    raise ValueError(f"unknown padding mode {padding_mode!r}")


def separable_filter(x: Tensor, kernel_1d: Tensor) -> Tensor:
    """Filter each channel of ``x`` ``(B, C, *spatial)`` with the same odd 1D kernel along every
    spatial axis, zero padding (equals the outer-product kernel with zero padding)."""
    dims = x.dim() - 2
    for axis in range(dims):
        shape = [1] * dims
        shape[axis] = kernel_1d.numel()
        x = depthwise_filter(x, kernel_1d.reshape(shape), "zeros")
    return x


def window_counts(labels: Tensor, valid: Tensor | None, num_classes: int, size: int) -> Tensor:
    """``(B, C, *spatial)``: how many voxels of each class lie in the ``size^d`` window (odd ``size``)
    around every voxel of a ``(B, *spatial)`` label map (values in ``[0, C)``); voxels outside the
    image count as class 0 (zero padding of the label map), voxels where ``valid`` is False as no
    class (``valid=None``: every voxel is valid).

    Exact integer counts, uint8 while ``size^d <= 255`` (int32 beyond): the one-hot of the padded
    map summed by ``size`` shifted adds per axis. ``counts / size**d`` equals
    ``avg_pool(one_hot, size, stride=1, padding=size // 2, count_include_pad=True)`` plus the
    outside share on class 0.
    """
    return one_hot_and_window_counts(label_codes(labels, valid, num_classes), num_classes, size)[1]


def label_codes(labels: Tensor, valid: Tensor | None, num_classes: int) -> Tensor:
    """``(B, *spatial)`` labels as uint8 (int32 from 255 classes on), ``num_classes`` (no class)
    where ``valid`` is False (``valid=None``: every voxel is valid)."""
    codes = labels.to(torch.uint8 if num_classes < 255 else torch.int32)
    if valid is not None:
        codes.masked_fill_(~valid, num_classes)
    return codes


def one_hot_and_window_counts(codes: Tensor, num_classes: int, size: int) -> tuple[Tensor, Tensor]:
    """The uint8 one-hot ``(B, C, *spatial)`` of :func:`label_codes` (all 0 where no class) and
    :func:`window_counts`, both from the same padded one-hot."""
    half, dims = size // 2, codes.dim() - 1
    padded_codes = F.pad(codes, (half, half) * dims, value=0)
    padded = torch.empty((codes.shape[0], num_classes, *padded_codes.shape[1:]), dtype=torch.bool, device=codes.device)
    label = torch.empty_like(padded_codes)
    for k in range(num_classes):  # against a filled tensor: with a broadcast operand ATen's CPU compare is ~10x slower
        torch.eq(padded_codes, label.fill_(k), out=padded[:, k])
    padded = padded.view(torch.uint8)
    x = padded if size**dims <= 255 else padded.to(torch.int32)
    for axis in range(2, x.dim()):
        n = x.shape[axis] - 2 * half
        total = x.narrow(axis, 0, n) + x.narrow(axis, 1, n) if size > 1 else x.narrow(axis, 0, n).clone()
        for shift in range(2, size):
            total += x.narrow(axis, shift, n)
        x = total
    inside = padded[(slice(None), slice(None)) + tuple(slice(half, half + n) for n in codes.shape[1:])]
    return inside.contiguous(), x
