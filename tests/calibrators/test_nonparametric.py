"""Histogram binning against hand-computed bins; isotonic regression against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.isotonic import IsotonicRegression

from segcalib.calibrators import build_calibrator
from segcalib.calibrators.isotonic import pool_adjacent_violators
from segcalib.errors import DataError
from tests.calibrators._single_thread import single_thread  # noqa: F401 (autouse fixture)


def _two_class_logits(p1: list[float]) -> torch.Tensor:
    """Logits ``(1, 2, n, 1)`` whose softmax is ``(1 - p1, p1)``."""
    p = torch.tensor(p1, dtype=torch.float64)
    return torch.stack([torch.log1p(-p), torch.log(p)]).reshape(1, 2, -1, 1).float()


def test_histogram_binning_matches_hand_computed_bins() -> None:
    # 4 bins (0, .25], (.25, .5], (.5, .75], (.75, 1]; class-1 probabilities and labels:
    p1 = [0.1, 0.2, 0.6, 0.7, 0.65, 0.9]
    y = torch.tensor([0, 1, 1, 1, 0, 1]).reshape(1, -1, 1)
    cal = build_calibrator("histogram_binning", 2, n_bins=4)
    cal.update(_two_class_logits(p1), y)
    cal.fit()
    values = torch.tensor(cal.get_params()["bin_values"], dtype=torch.float64)
    # class 1: bin0 {0.1:0, 0.2:1} -> 1/2; bin1 empty -> centre 0.375; bin2 {.6,.7,.65} -> 2/3; bin3 {.9} -> 1
    # class 0 sees 1 - p1 = .9 .8 .4 .3 .35 .1 with outcome y == 0:
    #   bin0 {.1: y=1 -> 0} -> 0; bin1 {.4, .3, .35: 0, 0, 1} -> 1/3; bin2 empty -> 0.625; bin3 {.9: 1, .8: 0} -> 1/2
    expected = torch.tensor([[0.0, 1 / 3, 0.625, 0.5], [0.5, 0.375, 2 / 3, 1.0]], dtype=torch.float64)
    assert torch.allclose(values, expected, atol=1e-12)
    # p1 = 0.6 -> class 1 bin2 (2/3), class 0 (0.4) bin1 (1/3): renormalised (1/3, 2/3)
    # p1 = 0.2 -> class 1 bin0 (1/2), class 0 (0.8) bin3 (1/2): (1/2, 1/2)
    out = cal.transform(_two_class_logits([0.6, 0.2]))
    assert torch.allclose(out[0, :, :, 0].T, torch.tensor([[1 / 3, 2 / 3], [0.5, 0.5]]), atol=1e-6)


def test_histogram_binning_all_zero_voxel_keeps_softmax_and_mask_restricts() -> None:
    # 3 classes, 4 bins; voxels (p0, p1, p2) -> label; the last one lies outside the mask
    p = torch.tensor([[0.6, 0.1, 0.3], [0.1, 0.3, 0.6], [0.3, 0.6, 0.1], [0.6, 0.3, 0.1]], dtype=torch.float64)
    logits = p.log().T.reshape(1, 3, 4, 1).float()
    y = torch.tensor([2, 2, 1, 0]).reshape(1, 4, 1)
    mask = torch.tensor([True, True, True, False]).reshape(1, 4, 1)
    cal = build_calibrator("histogram_binning", 3, n_bins=4)
    cal.update(logits, y, mask)
    cal.fit()
    # class 0: bins 0, 1, 2 hold one negative each, bin 3 is empty (centre 7/8); class 1: the positive of
    # voxel 3 in bin 2; class 2: the positives of voxels 1 (bin 1) and 2 (bin 2)
    expected = [[0.0, 0.0, 0.0, 0.875], [0.0, 0.0, 1.0, 0.875], [0.0, 1.0, 1.0, 0.875]]
    assert cal.get_params()["bin_values"] == expected
    # (0.6, 0.3, 0.1) falls in cells that are all 0 (the masked voxel would have made class 0's 1): softmax stays
    out = cal.transform(torch.tensor([0.6, 0.3, 0.1]).log().reshape(1, 3, 1, 1))
    assert torch.allclose(out.reshape(-1), torch.tensor([0.6, 0.3, 0.1]), atol=1e-6)


def test_histogram_binning_stream_equals_one_batch_and_bad_labels() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, 6, 5, generator=g) * 3
    y = torch.randint(0, 3, (4, 6, 5), generator=g)
    one = build_calibrator("histogram_binning", 3)
    one.update(z, y)
    streamed = build_calibrator("histogram_binning", 3)
    for b in range(4):
        streamed.update(z[b : b + 1], y[b : b + 1])
    assert one.fit().get_params() == streamed.fit().get_params()
    with pytest.raises(DataError, match="labels"):
        one.update(z, torch.full_like(y, 7))


def test_pool_adjacent_violators_hand_case() -> None:
    y = torch.tensor([1.0, 3.0, 2.0, 0.0, 5.0], dtype=torch.float64)
    w = torch.tensor([1.0, 1.0, 1.0, 2.0, 1.0], dtype=torch.float64)
    # 3, 2, 0 (weights 1, 1, 2) pool to (3 + 2 + 2 * 0) / 4 = 1.25, above the leading 1; then 5
    assert pool_adjacent_violators(y, w).tolist() == pytest.approx([1.0, 1.25, 1.25, 1.25, 5.0], abs=1e-15)


def _miscalibrated_binary(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.001, 0.999, n)
    y = (rng.uniform(size=n) < p**2).astype(np.int64)  # the true frequency is p^2
    return p, y


def _isotonic_class1(p: np.ndarray, y: np.ndarray, n_fine: int = 4096):
    cal = build_calibrator("isotonic", 2, n_fine=n_fine)
    logits = _two_class_logits(p.tolist())
    cal.update(logits, torch.from_numpy(y).reshape(1, -1, 1))
    cal.fit()
    seen = torch.softmax(logits.double(), dim=1)[0, 1, :, 0].numpy()  # the probabilities it sees
    return cal, seen


def test_isotonic_equals_sklearn_on_fine_bin_means() -> None:
    p, y = _miscalibrated_binary(60_000, seed=1)
    cal, seen = _isotonic_class1(p, y)
    b = np.clip(np.ceil(seen * 4096) - 1, 0, 4095).astype(np.int64)
    means = np.bincount(b, weights=seen, minlength=4096) / np.maximum(np.bincount(b, minlength=4096), 1)
    reference = IsotonicRegression(out_of_bounds="clip").fit(means[b], y)
    grid = np.linspace(0, 1, 3001)
    ours = cal.one_vs_rest(torch.from_numpy(np.stack([1 - grid, grid]))[None])[0, 1].numpy()
    assert np.abs(ours - reference.predict(grid)).max() < 1e-9
    # against the fit on the unrounded probabilities (moved by < 1/4096): the documented bound
    raw = IsotonicRegression(out_of_bounds="clip").fit(seen, y).predict(grid)
    diff = np.abs(ours - raw)
    assert diff.mean() < 1e-3 and diff.max() < 0.05
    # and it calibrates: close to the true frequency p^2 away from the ends
    inner = (grid > 0.2) & (grid < 0.9)
    assert np.abs(ours[inner] - grid[inner] ** 2).mean() < 0.02


def test_isotonic_multiclass_renormalised_monotone_and_round_trip() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 4, 7, 6, 5, generator=g) * 2
    y = torch.distributions.Categorical(logits=z.movedim(1, -1) / 2).sample()
    cal = build_calibrator("isotonic", 4, n_fine=256)
    for b in range(3):
        cal.update(z[b : b + 1], y[b : b + 1])
    cal.fit()
    out = cal.transform(z)
    assert out.dtype == torch.float32 and torch.allclose(out.sum(1), torch.ones(3, 7, 6, 5), atol=1e-6)
    grid = torch.linspace(0, 1, 101, dtype=torch.float64)
    per_class = cal.one_vs_rest(grid.reshape(1, 1, -1).expand(1, 4, -1))
    assert bool((per_class.diff(dim=-1) >= 0).all())
    # the one-batch fit is the same step function (histograms add exactly)
    one = build_calibrator("isotonic", 4, n_fine=256)
    one.update(z, y)
    assert torch.allclose(one.fit().transform(z), out, atol=1e-6)
    again = type(cal).from_params(4, cal.get_params())
    assert torch.equal(again.transform(z), out)
    params = cal.get_params()
    params["x"][0], params["y"][0] = [0.2, 0.8], [0.9, 0.1]
    with pytest.raises(DataError, match="non-decreasing"):
        type(cal).from_params(4, params)
