"""Sliding-window inference of whole volumes (MONAI), on the GPU when there is one.

2D networks run on 3D volumes slice by slice: the window has size 1 along the slice axis and
:class:`SliceWise` squeezes that axis away for the network, so 2D and 3D share one code path.
If the GPU runs out of memory, the volume is predicted again with the stitching buffer on the
CPU (the network stays on the GPU) and a warning says so.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import nn

log = logging.getLogger("segcalib")


class SliceWise(nn.Module):
    """Run a 2D network on ``(B, C, *spatial3d)`` windows that have size 1 along ``slice_axis``."""

    def __init__(self, net: nn.Module, slice_axis: int) -> None:
        super().__init__()
        self.net = net
        self.dim = slice_axis + 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.squeeze(self.dim)).unsqueeze(self.dim)


@dataclass
class SlidingWindow:
    """How to cover a volume with windows (sizes in voxels of the preprocessed volume)."""

    roi_size: Sequence[int]
    overlap: float = 0.5
    mode: str = "gaussian"
    sw_batch_size: int = 4
    amp: bool = True

    @classmethod
    def from_config(cls, cfg) -> "SlidingWindow":
        """From an :class:`~segcalib.config.ExperimentConfig` (2D: a slice-shaped 3D window)."""
        roi = list(cfg.roi_size)
        if cfg.data.mode == "2d":
            roi.insert(cfg.data.slice_axis, 1)
        inf = cfg.inference
        return cls(roi_size=roi, overlap=inf.overlap, mode=inf.mode, sw_batch_size=inf.sw_batch_size, amp=inf.amp)


def volume_network(net: nn.Module, cfg) -> nn.Module:
    """The network as a function of 3D windows (wraps 2D networks with :class:`SliceWise`)."""
    return SliceWise(net, cfg.data.slice_axis) if cfg.data.mode == "2d" else net


@torch.no_grad()
def predict_logits(
    net: nn.Module,
    image: torch.Tensor,
    window: SlidingWindow,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Logits ``(B, K, *spatial)`` float32 for an image ``(B, C, *spatial)``.

    The network runs on ``device`` (default: where its parameters are); the result stays there
    unless the GPU ran out of memory, in which case it comes back on the CPU.
    """
    device = torch.device(device) if device is not None else next(net.parameters()).device
    image = image.as_tensor() if hasattr(image, "as_tensor") else image
    autocast = _autocast(device, window.amp)

    def run(stitch_device: torch.device) -> torch.Tensor:
        with autocast:
            out = sliding_window_inference(
                image.to(device),
                roi_size=list(window.roi_size),
                sw_batch_size=window.sw_batch_size,
                predictor=net,
                overlap=window.overlap,
                mode=window.mode,
                sw_device=device,
                device=stitch_device,
            )
        return out.float()

    if device.type != "cuda":
        return run(device)
    return with_cpu_stitching_fallback(run, device, tuple(image.shape))


def with_cpu_stitching_fallback(run, device: torch.device, shape: tuple[int, ...]) -> torch.Tensor:
    """``run(device)``; on a GPU out-of-memory error, warn and ``run(cpu)`` (stitching on the CPU)."""
    try:
        return run(device)
    except torch.cuda.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        message = f"GPU out of memory predicting a volume of shape {shape}; retrying with the stitching on the CPU (slower)"
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        log.warning(message)
        return run(torch.device("cpu"))


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()
