"""The fused Triton kernel against the torch ops, through Triton's CPU interpreter.

Collected only by name from :func:`tests.metrics.test_binning_backends.test_triton_kernel_interpreted_on_cpu`,
which runs this file in a fresh process with ``TRITON_INTERPRET=1`` (Triton reads it when it is
first imported). Run by hand: ``TRITON_INTERPRET=1 python -m pytest tests/metrics/triton_interpreted.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

from segcalib.metrics import CalibrationMetric, binning
from segcalib.metrics.binning import HistogramRequest, batch_histograms
from tests.metrics.test_binning_backends import M, assert_same, batch_inputs
from tests.metrics.test_calibration import SPACING_3D, make_batch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
pytest.importorskip("triton")


@pytest.mark.parametrize(
    "batch, c, n, dtype, with_cells, n_bins",
    [
        (2, 4, 700, torch.float32, True, 15),
        (1, 4, 333, torch.float64, False, 15),
        (2, 3, 260, torch.float16, True, 10),
        (1, 2, 129, torch.bfloat16, True, 1),
        (1, 1, 64, torch.float32, False, 7),
    ],
)
def test_triton_kernel_equals_torch_ops(batch, c, n, dtype, with_cells, n_bins) -> None:
    p, y, cells = batch_inputs(batch=batch, c=c, n=n, seed=c + n)
    p = p.to(dtype)
    cells = cells if with_cells else None
    n_cells = 3 if with_cells else 1
    ref = batch_histograms(p, y, n_bins, cells, n_cells, HistogramRequest(), "torch")
    assert_same(batch_histograms(p, y, n_bins, cells, n_cells, HistogramRequest(), "triton"), ref)


def test_triton_kernel_many_cells() -> None:
    p, y, cells = batch_inputs(batch=2, n=400, n_cells=20)  # 21 x 15 (cell, bin) pairs: 512-wide blocks
    ref = batch_histograms(p, y, M, cells, 20, HistogramRequest(), "torch")
    assert_same(batch_histograms(p, y, M, cells, 20, HistogramRequest(), "triton"), ref)


def test_triton_kernel_subsets_and_strides() -> None:
    p, y, cells = batch_inputs(batch=2, n=300)
    strided = p.transpose(1, 2).contiguous().transpose(1, 2)
    for top, classwise, scores in ((True, False, False), (False, True, False), (True, False, True)):
        request = HistogramRequest(top=top, classwise=classwise, scores=scores)
        ref = batch_histograms(p, y, M, cells, 3, request, "torch")
        assert_same(batch_histograms(strided, y, M, cells, 3, request, "triton"), ref)


def test_metric_with_triton_kernel_equals_default(monkeypatch) -> None:
    probs, target = make_batch((10, 9, 8), batch=2, seed=8)
    target[0, :2] = 9  # ignored voxels
    default = CalibrationMetric(4, ignore_index=9)
    default.update(probs, target, spacing=SPACING_3D)
    monkeypatch.setattr(binning, "default_backend", lambda device: "triton")
    fused = CalibrationMetric(4, ignore_index=9)
    fused.update(probs, target, spacing=SPACING_3D)
    for name, value in default.state_tensors().items():
        torch.testing.assert_close(fused.state_tensors()[name], value, rtol=1e-6, atol=1e-9)
