"""MONAI U-Nets for 2D and 3D (no pretrained weights)."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from segcalib.models.registry import register_model


def _product(values: Sequence[int | Sequence[int]]) -> int:
    out = 1
    for v in values:
        out *= max(v) if isinstance(v, (list, tuple)) else int(v)
    return out


@register_model("unet", spatial_dims=(2, 3), size_divisor=lambda p: _product(p["strides"]))
def unet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] = (2, 2, 2),
    num_res_units: int = 2,
    norm: str = "instance",
    dropout: float = 0.0,
) -> nn.Module:
    """MONAI ``UNet`` (residual units, Kerfoot et al. 2018); ``len(strides) == len(channels) - 1``."""
    from monai.networks.nets import UNet

    if len(strides) != len(channels) - 1:
        raise ValueError(f"strides needs {len(channels) - 1} entries for {len(channels)} channels")
    return UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(channels),
        strides=tuple(strides),
        num_res_units=num_res_units,
        norm=norm,
        dropout=dropout,
    )


@register_model("basic_unet", spatial_dims=(2, 3), size_divisor=lambda p: 16)
def basic_unet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    features: Sequence[int] = (32, 32, 64, 128, 256, 32),
    norm: str = "instance",
    dropout: float = 0.0,
) -> nn.Module:
    """MONAI ``BasicUNet``: the classic 4-level U-Net (six feature sizes)."""
    from monai.networks.nets import BasicUNet

    return BasicUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        features=tuple(features),
        norm=norm,
        dropout=dropout,
    )


@register_model("dynunet", spatial_dims=(2, 3), size_divisor=lambda p: _product(p["strides"]))
def dynunet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    filters: Sequence[int] = (32, 64, 128, 256),
    strides: Sequence[int | Sequence[int]] = (1, 2, 2, 2),
    kernel_size: Sequence[int | Sequence[int]] | None = None,
    norm: str = "instance",
    res_block: bool = True,
) -> nn.Module:
    """MONAI ``DynUNet`` (the nnU-Net architecture); one stride and kernel per level."""
    from monai.networks.nets import DynUNet

    if len(filters) != len(strides):
        raise ValueError(f"filters ({len(filters)}) and strides ({len(strides)}) need one entry per level")
    kernels = list(kernel_size) if kernel_size is not None else [3] * len(strides)
    return DynUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernels,
        strides=list(strides),
        upsample_kernel_size=list(strides)[1:],
        filters=list(filters),
        norm_name=norm,
        res_block=res_block,
        deep_supervision=False,
    )
