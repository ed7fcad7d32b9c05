"""The batched one-pass histogram: the torch ops (CUDA's sync-free path, run here on CPU), the tuned
CPU kernel and the fused Triton kernel (interpreted on CPU) give the same sums; one update launches
a number of ops that depends on neither the volume's size nor the batch."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.bench_metrics import count_kernels
from segcalib.metrics import CalibrationMetric
from segcalib.metrics import binning
from segcalib.metrics.binning import HistogramRequest, batch_histograms, case_histograms
from segcalib.metrics.calibration_functional import calibration_update
from tests.metrics.test_calibration import SPACING_3D, make_batch

M = 15
ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")


def batch_inputs(batch: int = 2, c: int = 4, n: int = 1000, seed: int = 5, n_cells: int = 3):
    """Random probabilities with ties, exact 0/1 and bin-edge values; cells ``n_cells`` = dropped."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(batch, c, n, generator=gen).mul(3).softmax(1)
    p[:, :, :40] = 1.0 / c  # c-way ties: the first class wins
    p[:, :, 40:80] = torch.eye(c)[c - 1].view(1, c, 1)  # exact 0 and 1
    if c == 4:
        p[:, :, 80:120] = torch.tensor([2 / 15, 4 / 15, 5 / 15, 4 / 15]).view(1, 4, 1)  # on bin edges
    y = torch.randint(0, c, (batch, n), generator=gen)
    cells = torch.randint(0, n_cells + 1, (batch, n), generator=gen, dtype=torch.uint8)
    return p, y, cells


def assert_same(got: binning.Histograms, ref: binning.Histograms, rtol: float = 1e-12) -> None:
    for name in ("top", "classwise", "scores"):
        a, b = getattr(got, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.shape == b.shape, name
        if name != "scores":  # counts and label sums are integers: exactly equal
            torch.testing.assert_close(a[..., [0, 2]].cpu(), b[..., [0, 2]].cpu(), rtol=0, atol=0)
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=rtol, atol=1e-9, msg=name)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_batch_equals_each_case(backend) -> None:
    p, y, cells = batch_inputs(batch=3)
    got = batch_histograms(p, y, M, cells, 3, HistogramRequest(), backend)
    assert got.top.shape == (3, 3, M, 3) and got.classwise.shape == (3, 3, 4, M, 3) and got.scores.shape == (3, 3, 2)
    for b in range(3):
        one = case_histograms(p[b], y[b], M, cells[b], 3, tuned=False, chunk_size=10**6)
        assert_same(binning.Histograms(got.top[b], got.classwise[b], got.scores[b]), one)


def test_torch_backend_chunks_and_strides() -> None:
    p, y, cells = batch_inputs(batch=2, n=999)
    ref = batch_histograms(p, y, M, cells, 3, HistogramRequest(), "cpu")
    strided = p.transpose(1, 2).contiguous().transpose(1, 2)  # class stride 1, as channels-last maps
    assert_same(batch_histograms(strided, y, M, cells, 3, HistogramRequest(chunk_size=97), "torch"), ref)


def test_metric_on_torch_backend_equals_default(monkeypatch) -> None:
    probs, target = make_batch((12, 10, 8), batch=2, seed=4)
    default = CalibrationMetric(4)
    default.update(probs, target, spacing=SPACING_3D)
    monkeypatch.setattr(binning, "default_backend", lambda device: "torch")
    other = CalibrationMetric(4)
    other.update(probs, target, spacing=SPACING_3D)
    for name, value in default.state_tensors().items():
        torch.testing.assert_close(other.state_tensors()[name], value, rtol=1e-12, atol=1e-9)
    got, ref = other.compute().per_case, default.compute().per_case
    for a, b in zip(got, ref):
        assert a.n_voxels == b.n_voxels
        assert list(a.ece.values()) == pytest.approx(list(b.ece.values()), rel=1e-12)


def test_torch_backend_validates_before_adding() -> None:
    p, y, cells = batch_inputs(batch=1, n=50)
    with pytest.raises(ValueError, match="target labels"):
        batch_histograms(p, y + 4, M, cells, 3, HistogramRequest(validate=True), "torch")
    p[0, 1, 7] = float("nan")
    with pytest.raises(ValueError, match="probs must lie"):
        batch_histograms(p, y, M, cells, 3, HistogramRequest(validate=True), "torch")
    with pytest.raises(ValueError, match="unknown histogram backend"):
        batch_histograms(p, y, M, cells, 3, HistogramRequest(), "numba")


def test_failing_default_triton_kernel_falls_back_to_torch_ops(monkeypatch) -> None:
    from segcalib.metrics import binning_triton

    def broken(*args, **kwargs):
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(binning, "_TRITON_FAILED", [])
    monkeypatch.setattr(binning_triton, "triton_available", lambda: True)
    monkeypatch.setattr(binning_triton, "triton_histograms", broken)
    p, y, cells = batch_inputs(batch=2, n=300)
    ref = batch_histograms(p, y, M, cells, 3, HistogramRequest(), "torch")
    with pytest.raises(RuntimeError, match="no C compiler"):  # asked for by name: no fallback
        batch_histograms(p, y, M, cells, 3, HistogramRequest(), "triton")
    cuda = torch.device("cuda")
    monkeypatch.setattr(binning, "default_backend", lambda device, real=binning.default_backend: real(cuda))
    with pytest.warns(UserWarning, match="Triton histogram kernel failed"):
        assert_same(batch_histograms(p, y, M, cells, 3, HistogramRequest()), ref)
    assert binning._TRITON_FAILED and binning.default_backend(p.device) == "torch"  # no second try


def test_triton_kernel_leaves_large_histograms_to_torch_ops(monkeypatch) -> None:
    from segcalib.metrics import binning_triton

    calls = []
    monkeypatch.setattr(binning_triton, "triton_histograms", lambda *args: calls.append(args))
    monkeypatch.setattr(binning, "default_backend", lambda device: "triton")
    p, y, cells = batch_inputs(batch=1, n=200, n_cells=127)
    if HAS_TRITON:
        assert binning_triton.triton_supports(15, 3) and not binning_triton.triton_supports(15, 127)
        assert not binning_triton.triton_supports(1000, 1)
    monkeypatch.setattr(binning_triton, "triton_supports", lambda n_bins, n_cells: (n_cells + 1) * n_bins <= 1024)
    ref = batch_histograms(p, y, M, cells, 127, HistogramRequest(), "torch")
    assert_same(batch_histograms(p, y, M, cells, 127, HistogramRequest()), ref)  # 128 x 15 pairs: torch ops
    assert not calls
    batch_histograms(p, y, M, cells.clamp(max=3), 3, HistogramRequest())  # 4 x 15 pairs: the kernel
    assert len(calls) == 1


@needs_triton
def test_triton_backend_by_name_rejects_large_histograms() -> None:
    p, y, cells = batch_inputs(batch=1, n=50)
    with pytest.raises(ValueError, match="at most 1024"):
        batch_histograms(p, y, 1000, cells, 3, HistogramRequest(), "triton")


def test_update_launches_a_fixed_number_of_ops(monkeypatch) -> None:
    # the torch backend is what runs on a device without Triton: no per-chunk or per-case loops
    monkeypatch.setattr(binning, "default_backend", lambda device: "torch")
    counts = {}
    for batch, size in ((1, 8), (1, 20), (3, 8), (3, 20)):
        probs, target = make_batch((size, size, size), batch=batch, seed=batch)
        metric = CalibrationMetric(4, regions=("all", "foreground"), per_case=False, validate_args=False)
        metric.update(probs, target)  # the first call moves the state; count the second
        counts[batch, size] = sum(count_kernels(lambda: metric.update(probs, target)).values())
    assert counts[1, 8] == counts[1, 20] and counts[3, 8] == counts[3, 20], counts
    assert max(counts.values()) <= 90, counts
    # with the boundary band (its definition loops over cases, not voxels) the count is fixed per batch size
    small, large = (make_batch((s, s, s), batch=1, seed=2) for s in (10, 24))
    metric = CalibrationMetric(4, validate_args=False)
    metric.update(*small, spacing=SPACING_3D)
    n_small = sum(count_kernels(lambda: metric.update(*small, spacing=SPACING_3D)).values())
    n_large = sum(count_kernels(lambda: metric.update(*large, spacing=SPACING_3D)).values())
    assert n_small == n_large <= 200


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="already interpreted")
def test_triton_kernel_interpreted_on_cpu() -> None:
    # Triton reads TRITON_INTERPRET when it is first imported, so the kernel's tests run in a fresh process
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).with_name("triton_interpreted.py"))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert re.search(r"\b8 passed\b", run.stdout) and "skipped" not in run.stdout, run.stdout[-2000:]


@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_histograms_equal_cpu_without_host_sync(backend) -> None:
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("needs Triton")
    p, y, cells = batch_inputs(batch=2, n=5000)
    ref = batch_histograms(p, y, M, cells, 3, HistogramRequest(), "cpu")
    args = (p.cuda(), y.cuda(), M, cells.cuda(), 3, HistogramRequest())
    batch_histograms(*args, backend)  # compile / warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = batch_histograms(*args, backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_same(got, ref, rtol=1e-10)


@needs_cuda
def test_cuda_default_backend() -> None:
    assert binning.default_backend(torch.device("cuda")) == ("triton" if HAS_TRITON else "torch")
    assert binning.default_backend(torch.device("cpu")) == "cpu"
