"""Binning exactly as SPEC §3 and the one-pass histogram kernel against plain NumPy loops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from segcalib.metrics.binning import HistogramRequest, bin_index, case_histograms
from segcalib.metrics.binning_cpu import tuned_case_histograms
from tests.metrics._reference import ref_bin

M = 15


def test_bin_index_edges_float64() -> None:
    edges = torch.tensor([k / M for k in range(M + 1)], dtype=torch.float64)
    # 0 -> first bin, k/M -> bin k-1 (bins are (b/M, (b+1)/M]), 1 -> last bin
    assert bin_index(edges, M).tolist() == [0] + list(range(M))
    assert bin_index(edges + 1e-12, M)[:-1].tolist() == list(range(M))
    # one ulp above an edge: the formula evaluated in float64 (as the NumPy reference) decides
    above = torch.nextafter(edges, torch.tensor(2.0, dtype=torch.float64))
    assert (bin_index(above, M).numpy() == ref_bin(above.numpy(), M)).all()
    assert (bin_index(edges, M).numpy() == ref_bin(edges.numpy(), M)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_bin_index_low_precision_matches_float64_formula(dtype: torch.dtype) -> None:
    # values at, just below and just above every edge in the input precision
    centre = torch.tensor([k / M for k in range(M + 1)], dtype=dtype)
    lower = torch.nextafter(centre, torch.zeros((), dtype=dtype))
    upper = torch.nextafter(centre, torch.ones((), dtype=dtype) * 2).clamp(max=1)
    p = torch.cat([centre, lower, upper, torch.rand(1000).to(dtype)])
    expected = ref_bin(p.double().numpy(), M)
    assert (bin_index(p, M).numpy() == expected).all()
    # float32 arithmetic would misplace some of these: check the test is not vacuous
    if dtype == torch.float32:
        naive = torch.clamp(torch.ceil(p * M) - 1, 0, M - 1).long().numpy()
        assert (naive != expected).any()


def _reference_histograms(p: np.ndarray, y: np.ndarray, cells: np.ndarray, n_cells: int, eps: float = 1e-12):
    c, n = p.shape
    top = np.zeros((n_cells, M, 3))
    cls = np.zeros((n_cells, c, M, 3))
    scores = np.zeros((n_cells, 2))
    for i in range(n):
        z = cells[i]
        if z >= n_cells:
            continue
        col = p[:, i]
        conf, pred = col.max(), int(np.argmax(col))
        b = ref_bin(conf, M)
        top[z, b] += [1.0, conf, float(pred == y[i])]
        for k in range(c):
            cls[z, k, ref_bin(col[k], M)] += [1.0, col[k], float(y[i] == k)]
        onehot = np.eye(c)[y[i]]
        scores[z] += [-np.log(max(col[y[i]], eps)), ((col - onehot) ** 2).sum()]
    return top, cls, scores


@pytest.fixture
def kernel_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    c, n = 4, 3000
    p = torch.randn(c, n, generator=gen).mul(3).softmax(0)
    p[:, :50] = 0.25  # four-way ties: the first class wins
    p[:, 50:100] = torch.tensor([0.5, 0.5, 0.0, 0.0]).view(4, 1)
    p[:, 100:150] = torch.tensor([0.0, 0.0, 0.0, 1.0]).view(4, 1)  # exact 0 and 1
    p[:, 150:200] = torch.tensor([2 / 15, 4 / 15, 5 / 15, 4 / 15]).view(4, 1)  # on bin edges
    y = torch.randint(0, c, (n,), generator=gen)
    cells = torch.randint(0, 4, (n,), generator=gen, dtype=torch.uint8)  # 3 = dropped
    return p, y, cells


@pytest.mark.parametrize("tuned", [False, True], ids=["reference", "tuned_cpu"])
def test_kernel_matches_reference(kernel_inputs, tuned) -> None:
    p, y, cells = kernel_inputs
    hist = case_histograms(p, y, M, cells, 3, tuned=tuned)
    top, cls, scores = _reference_histograms(p.double().numpy(), y.numpy(), cells.numpy(), 3)
    np.testing.assert_array_equal(hist.top[..., 0].numpy(), top[..., 0])  # counts exact
    np.testing.assert_array_equal(hist.top[..., 2].numpy(), top[..., 2])
    np.testing.assert_array_equal(hist.classwise[..., [0, 2]].numpy(), cls[..., [0, 2]])
    np.testing.assert_allclose(hist.top.numpy(), top, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(hist.classwise.numpy(), cls, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(hist.scores.numpy(), scores, rtol=1e-12)


@pytest.mark.parametrize(
    "chunk, tuned, use_bincount, dtype",
    [
        (7, True, False, torch.float32),
        (256, True, False, torch.float64),
        (1000, True, True, torch.float16),
        (None, True, True, torch.float32),
        (100, True, False, torch.bfloat16),
        (7, False, None, torch.float32),
        (1000, False, None, torch.float16),
        (100, False, None, torch.bfloat16),
    ],
)
def test_kernel_independent_of_chunks_kernel_and_backend(kernel_inputs, chunk, tuned, use_bincount, dtype) -> None:
    p, y, cells = kernel_inputs
    p = p.to(dtype)
    ref = case_histograms(p, y, M, cells, 3, chunk_size=10**6, tuned=False)
    threads = torch.get_num_threads()
    if tuned:
        got = tuned_case_histograms(p, y, M, cells, 3, HistogramRequest(chunk_size=chunk), use_bincount)
    else:
        got = case_histograms(p, y, M, cells, 3, chunk_size=chunk, tuned=False)
    assert torch.get_num_threads() == threads  # no kernel changes torch's settings
    for name in ("top", "classwise", "scores"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-12, atol=1e-9)


def test_kernel_subsets_agree(kernel_inputs) -> None:
    p, y, _ = kernel_inputs
    full = case_histograms(p, y, M)
    for top, classwise, scores in itertools.product([True, False], repeat=3):
        if (scores and not top) or not (top or classwise):
            continue
        part = case_histograms(p, y, M, top=top, classwise=classwise, scores=scores)
        for name, flag in (("top", top), ("classwise", classwise), ("scores", scores)):
            if flag:
                torch.testing.assert_close(getattr(part, name), getattr(full, name), rtol=1e-12, atol=1e-9)
            else:
                assert getattr(part, name) is None


def test_kernel_rejects_inconsistent_arguments(kernel_inputs) -> None:
    p, y, cells = kernel_inputs
    with pytest.raises(ValueError):
        case_histograms(p, y, M, None, 3)
    with pytest.raises(ValueError):
        case_histograms(p, y, M, top=False, scores=True)


def test_accumulate_counts_and_sums_on_both_backends() -> None:
    from segcalib.metrics.binning_cpu import _accumulate

    index = torch.tensor([0, 2, 2, 5])
    weights = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    for use_bincount in (False, True):
        acc = torch.zeros(6, dtype=torch.float64)
        _accumulate(acc, index, weights, use_bincount)
        assert acc.tolist() == [0.5, 0.0, 3.0, 0.0, 0.0, 4.0]
    counts = torch.zeros(6, dtype=torch.float64)
    _accumulate(counts, index, torch.empty(0, dtype=torch.float64), True)  # empty weights: counts (GPU path)
    assert counts.tolist() == [1.0, 0.0, 2.0, 0.0, 0.0, 1.0]
