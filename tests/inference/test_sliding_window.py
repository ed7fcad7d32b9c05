"""Sliding-window inference: equals a direct forward pass, 2D networks on volumes, OOM fallback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segcalib.inference.sliding_window import SliceWise, SlidingWindow, predict_logits, with_cpu_stitching_fallback


class PointwiseNet(nn.Module):
    """A 1x1 convolution: windows cannot change its output, so stitching must be exact."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.conv = conv(1, 3, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_3d_windows_stitch_exactly(mode: str) -> None:
    net = PointwiseNet(3).eval()
    image = torch.randn(1, 1, 20, 17, 13)
    window = SlidingWindow(roi_size=[8, 8, 8], overlap=0.5, mode=mode, sw_batch_size=3)
    out = predict_logits(net, image, window)
    assert torch.allclose(out, net(image), atol=1e-5)


def test_2d_network_runs_slice_by_slice() -> None:
    net2d = PointwiseNet(2).eval()
    image = torch.randn(1, 1, 12, 10, 7)
    for axis in (0, 2):
        roi = [8, 8, 8]
        roi[axis] = 1
        out = predict_logits(SliceWise(net2d, axis), image, SlidingWindow(roi_size=roi, overlap=0.25))
        expected = torch.stack([net2d(image.select(axis + 2, i)) for i in range(image.shape[axis + 2])], dim=axis + 2)
        assert torch.allclose(out, expected, atol=1e-5)


def test_out_of_memory_retries_with_cpu_stitching() -> None:
    calls = []

    def run(stitch: torch.device) -> torch.Tensor:
        calls.append(stitch.type)
        if stitch.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return torch.ones(1)

    with pytest.warns(RuntimeWarning, match="stitching on the CPU"):
        out = with_cpu_stitching_fallback(run, torch.device("cuda", 0), (1, 1, 512, 512, 512))
    assert calls == ["cuda", "cpu"] and out.item() == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu() -> None:
    net = PointwiseNet(3).eval()
    image = torch.randn(1, 1, 24, 20, 16)
    window = SlidingWindow(roi_size=[16, 16, 16], amp=False)
    cpu = predict_logits(net, image, window)
    gpu = predict_logits(net.cuda(), image, window, device="cuda")
    assert gpu.is_cuda and torch.allclose(gpu.cpu(), cpu, atol=1e-4)
