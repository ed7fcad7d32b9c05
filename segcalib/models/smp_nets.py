"""segmentation-models-pytorch U-Net for 2D slices, any smp encoder, never pretrained."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from segcalib.models.registry import register_model


@register_model("smp_unet", spatial_dims=(2,), size_divisor=lambda p: 2 ** int(p["encoder_depth"]))
def smp_unet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    encoder_name: str = "resnet18",
    encoder_depth: int = 5,
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
) -> nn.Module:
    """smp ``Unet`` with an smp/timm encoder; ``encoder_weights=None``, so nothing is downloaded."""
    import segmentation_models_pytorch as smp

    if encoder_name not in smp.encoders.get_encoder_names() and not encoder_name.startswith("tu-"):
        raise ValueError(f"unknown smp encoder {encoder_name!r} (see smp.encoders.get_encoder_names())")
    if len(decoder_channels) != encoder_depth:
        raise ValueError(f"decoder_channels needs {encoder_depth} entries (one per encoder stage)")
    return smp.Unet(
        encoder_name=encoder_name,
        encoder_depth=encoder_depth,
        encoder_weights=None,
        decoder_channels=tuple(decoder_channels),
        in_channels=in_channels,
        classes=out_channels,
    )
