"""Hard / soft L1-ACE (Barfoot et al.; MONAI PR #9092 semantics) and their Dice / CE combinations.

The reference below is written from the paper and the public code's semantics with explicit loops
over images, classes, voxels and bins on float64 scalars (autograd gives its gradient), sharing
nothing with ``segcalib.losses.l1ace`` (no scatter, no bucketize, no vectorised binning).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from segcalib.errors import ConfigError
from segcalib.losses import build_loss, loss_parameters
from tests.losses import _reference as ref
from tests.losses._helpers import SHAPES, random_batch

EPS32 = 2.0**-23  # float32 machine epsilon: the bins cover [0, 1 + EPS32]


def _value(x) -> float:
    return float(x.detach()) if torch.is_tensor(x) else float(x)


def _bins_of(p, num_bins: int, soft: bool) -> list:
    """(bin, weight) pairs of one probability ``p`` (a 0-d tensor): the hard bin
    (edge_j < p <= edge_j+1), or the two neighbouring centres with linear weights (differentiable
    in p), all the weight to the end bin below the first / above the last centre."""
    top = 1.0 + EPS32
    value = _value(p)
    if not soft:
        for j in range(num_bins):
            if value <= (j + 1) * top / num_bins:
                return [(j, 1.0)]
        return [(num_bins - 1, 1.0)]
    centres = [(2 * j + 1) * top / (2 * num_bins) for j in range(num_bins)]
    if value <= centres[0]:
        return [(0, 1.0)]
    if value > centres[-1]:
        return [(num_bins - 1, 1.0)]
    for j in range(num_bins - 1):
        if centres[j] < value <= centres[j + 1]:
            t = (p - centres[j]) / (centres[j + 1] - centres[j])
            return [(j, 1.0 - t), (j + 1, t)]
    raise AssertionError(value)


def reference_l1ace(
    z: torch.Tensor,
    y: torch.Tensor,
    num_bins: int = 20,
    soft: bool = False,
    empty_weight: float = 0.01,
    include_background: bool = True,
    ignore_empty_classes: bool = True,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean over images b and classes c of the mean over occupied bins of |mean p - mean [y == c]|."""
    batch, classes = z.shape[:2]
    terms = []
    for b in range(batch):
        zb = z[b].reshape(classes, -1)
        yb = y[b].reshape(-1).tolist()
        kept = [i for i, label in enumerate(yb) if label != ignore_index]
        probs = {i: torch.softmax(zb[:, i], 0) for i in kept}
        for c in range(0 if include_background else 1, classes):
            weight = [0.0] * num_bins
            sum_p = [0.0] * num_bins
            sum_y = [0.0] * num_bins
            for i in kept:
                p = probs[i][c]
                for j, w in _bins_of(p, num_bins, soft):
                    weight[j] = weight[j] + w
                    sum_p[j] = sum_p[j] + w * p
                    sum_y[j] = sum_y[j] + w * float(yb[i] == c)
            gaps = [
                abs(sum_p[j] / weight[j] - sum_y[j] / weight[j])
                for j in range(num_bins)
                if _value(weight[j]) > 0 and (not soft or _value(weight[j]) >= empty_weight)
            ]
            present = any(yb[i] == c for i in kept)
            if not gaps or (ignore_empty_classes and not present):
                terms.append(z.new_zeros(()))
            else:
                terms.append(sum(gaps) / len(gaps))
    return torch.stack([torch.as_tensor(t, dtype=z.dtype) for t in terms]).mean()


def _logits(*probs_per_voxel: tuple[float, ...]) -> torch.Tensor:
    """(1, C, 1, V) float64 logits whose softmax at voxel v is ``probs_per_voxel[v]``."""
    z = torch.tensor([[math.log(p) for p in probs] for probs in probs_per_voxel], dtype=torch.float64)
    return z.T.reshape(1, z.shape[1], 1, z.shape[0])


# -- hand-derived values ----------------------------------------------------------------------------


def test_hard_two_voxels_by_hand() -> None:
    # voxel A: label 0, p = (0.875, 0.125); voxel B: label 1, p = (0.375, 0.625); bins of width 0.05.
    # class 0: A in bin 17 (|0.875 - 1| = 0.125), B in bin 7 (|0.375 - 0| = 0.375) -> 0.25
    # class 1: A in bin 2 (|0.125 - 0| = 0.125), B in bin 12 (|0.625 - 1| = 0.375) -> 0.25; mean 0.25
    z = _logits((0.875, 0.125), (0.375, 0.625))
    y = torch.tensor([[[0, 1]]])
    assert build_loss("hardl1ace")(z, y).item() == pytest.approx(0.25, abs=1e-14)
    # Both voxels in one bin of class 0 (0.875 and 0.86 in bin 17): |0.8675 - 0.5| = 0.3675;
    # class 1: 0.125 (bin 2) and 0.14 (bin 2): |0.1325 - 0.5| = 0.3675
    z = _logits((0.875, 0.125), (0.86, 0.14))
    assert build_loss("hardl1ace")(z, y).item() == pytest.approx(0.3675, abs=1e-14)


def test_soft_two_voxels_sharing_a_bin_by_hand() -> None:
    # Centres at 0.025, 0.075, ...: A (label 0) p0 = 0.85 -> bins 16, 17 half each; B (label 1)
    # p0 = 0.8 -> bins 15, 16 half each. Class 0: bin 15 |0.8 - 0| = 0.8; bin 16 (0.425 + 0.4) / 1
    # vs 0.5 -> 0.325; bin 17 |0.85 - 1| = 0.15 -> mean 1.275 / 3 = 0.425. Class 1 mirrors it: 0.425.
    z = _logits((0.85, 0.15), (0.8, 0.2))
    y = torch.tensor([[[0, 1]]])
    # the bins end at 1 + EPS32, so t = 1/2 up to ~1e-7
    assert build_loss("softl1ace")(z, y).item() == pytest.approx(0.425, abs=1e-6)
    # hard binning of the same: class 0: 0.85 (bin 16, |0.85 - 1|) and 0.8 (bin 15, |0.8 - 0|) -> 0.475
    assert build_loss("hardl1ace")(z, y).item() == pytest.approx(0.475, abs=1e-14)


def test_absent_class_counts_zero_in_the_mean() -> None:
    # C = 3, labels (0, 1): class 2 is absent and adds 0 to a mean over 3 classes.
    z = _logits((0.6, 0.3, 0.1), (0.2, 0.7, 0.1))
    y = torch.tensor([[[0, 1]]])
    # class 0: 0.6 (bin 11, y 1) -> 0.4; 0.2 (bin 3, y 0) -> 0.2 => 0.3
    # class 1: 0.3 (bin 5, y 0) -> 0.3; 0.7 (bin 13, y 1) -> 0.3 => 0.3
    assert build_loss("hardl1ace")(z, y).item() == pytest.approx(0.6 / 3, abs=1e-14)
    # counted with ignore_empty_classes=False: class 2: 0.1 twice in bin 1, y = 0 -> 0.1
    value = build_loss("hardl1ace", ignore_empty_classes=False)(z, y).item()
    assert value == pytest.approx(0.7 / 3, abs=1e-14)
    # without background: mean over classes 1, 2 -> (0.3 + 0) / 2
    assert build_loss("hardl1ace", include_background=False)(z, y).item() == pytest.approx(0.15, abs=1e-14)


def test_soft_bins_below_the_empty_weight_are_left_out() -> None:
    # One voxel, label 0, p0 = 0.8 + 0.001 * 0.05: weight 0.001 in bin 16 and 0.999 in bin 15.
    # With empty_weight 0.01 bin 16 is left out; with 0 both bins count (each has mean p = p).
    p0 = 0.8 + 0.001 * 0.05 * (1 + EPS32)
    z = _logits((p0, 1 - p0))
    y = torch.tensor([[[0]]])
    assert build_loss("softl1ace")(z, y).item() == pytest.approx((1 - p0) / 2, abs=1e-12)  # class 1 absent
    assert build_loss("softl1ace", empty_weight=0.0)(z, y).item() == pytest.approx((1 - p0) / 2, abs=1e-12)
    expected = reference_l1ace(z, y, soft=True, empty_weight=0.01).item()
    assert build_loss("softl1ace")(z, y).item() == pytest.approx(expected, abs=1e-14)


# -- the reference on random inputs (values and gradients) -------------------------------------------


CASES = {
    "defaults": {},
    "no_background": {"include_background": False},
    "empty_counted": {"ignore_empty_classes": False},
    "seven_bins": {"num_bins": 7},
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("dims", sorted(SHAPES))
def test_matches_the_float64_reference(case: str, soft: bool, dims: str) -> None:
    params = CASES[case]
    logits, target = random_batch(SHAPES[dims], dtype=torch.float64, seed=41, scale=2.0)
    target[target == 2] = 1  # class 2 absent from both images
    target[0, 0] = 2  # ... except a row of image 0 (present there only)
    target[1, 1] = -100  # ignored voxels
    name = "softl1ace" if soft else "hardl1ace"
    z = logits.clone().requires_grad_(True)
    value = build_loss(name, **params)(z, target)
    value.backward()
    z_ref = logits.clone().requires_grad_(True)
    expected = reference_l1ace(z_ref, target, soft=soft, **params)
    expected.backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(z.grad[1, :, 1]) == 0  # ignored voxels get no gradient
    assert z.grad.abs().sum() > 0


def test_soft_gradient_by_finite_differences() -> None:
    logits, target = random_batch((1, 3, 4, 5), dtype=torch.float64, seed=42, scale=1.5)
    loss = build_loss("softl1ace")
    z = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: loss(x, target), (z,), eps=1e-7, atol=1e-6)


def test_float32_matches_float64() -> None:
    logits, target = random_batch(SHAPES["3d"], dtype=torch.float64, seed=43)
    for name in ("hardl1ace", "softl1ace"):
        loss = build_loss(name)
        assert loss(logits.float(), target).item() == pytest.approx(loss(logits, target).item(), abs=1e-5)


# -- combinations (weights of the reference bundles) -------------------------------------------------


def _squared_dice(z: np.ndarray, y: np.ndarray, ignore_index: int = -100) -> float:
    """MONAI DiceLoss(squared_pred=True, smooth_nr=0, smooth_dr=1e-5), per image and class, mean."""
    batch, classes = z.shape[:2]
    out = []
    for b in range(batch):
        zf = ref.flat(z[b : b + 1])
        yf = y[b].reshape(-1)
        keep = yf != ignore_index
        p = np.exp(ref.log_softmax(zf))[keep]
        for c in range(classes):
            g = (yf[keep] == c).astype(np.float64)
            out.append(1 - 2 * (p[:, c] * g).sum() / ((p[:, c] ** 2).sum() + g.sum() + 1e-5))
    return float(np.mean(out))


COMPONENTS = ("ace", "dice", "ce")
COMBINATIONS = {
    "hardl1ace_dice": {"ace": 0.5, "dice": 0.5},
    "softl1ace_dice": {"ace": 0.5, "dice": 0.5},
    "hardl1ace_ce": {"ace": 0.5, "ce": 0.5},
    "softl1ace_ce": {"ace": 0.5, "ce": 0.5},
    "hardl1ace_dice_ce": {"ace": 0.33, "dice": 0.33, "ce": 0.33},
    "softl1ace_dice_ce": {"ace": 0.33, "dice": 0.33, "ce": 0.33},
}


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_combinations_are_the_weighted_sums(name: str) -> None:
    weights = COMBINATIONS[name]
    defaults = loss_parameters(name)
    assert {f"{k}_weight": v for k, v in weights.items()} == {k: v for k, v in defaults.items() if k[:-7] in COMPONENTS}
    logits, target = random_batch(SHAPES["3d"], dtype=torch.float64, seed=44)
    target[0, 1] = -100
    z, y = logits.numpy(), target.numpy()
    soft = name.startswith("soft")
    parts = {"ace": reference_l1ace(logits, target, soft=soft).item(), "ce": ref.ce(z, y)}
    parts["dice"] = _squared_dice(z, y) if name.endswith("dice_ce") else ref.dice(z, y)
    loss = build_loss(name)
    value = loss(logits, target).item()
    assert value == pytest.approx(sum(w * parts[k] for k, w in weights.items()), rel=1e-10)
    assert set(loss.last_components) == set(weights)
    for key in weights:
        assert loss.last_components[key].item() == pytest.approx(parts[key], rel=1e-10)
    other = build_loss(name, ace_weight=2.0)
    assert other(logits, target).item() == pytest.approx(value + (2.0 - weights["ace"]) * parts["ace"], rel=1e-10)


@pytest.mark.parametrize("squared", [False, True])
def test_dice_terms_match_monai(squared: bool) -> None:
    monai_losses = pytest.importorskip("monai.losses")
    extra = {"squared_pred": True, "smooth_nr": 0.0, "smooth_dr": 1e-5} if squared else {}
    reference = monai_losses.DiceLoss(to_onehot_y=True, softmax=True, **extra)
    logits, target = random_batch(SHAPES["3d"], dtype=torch.float64, seed=45)
    loss = build_loss("hardl1ace_dice_ce" if squared else "hardl1ace_dice")
    loss(logits, target)
    expected = reference(logits, target.unsqueeze(1)).item()
    # MONAI 1.6 writes the squared denominator as 2 (tp + fp/2 + fn/2) with squared norms (equal to
    # sum p^2 + sum g for one-hot g, rounded differently: ~1e-8 apart); the exact float64 check is
    # test_combinations_are_the_weighted_sums.
    assert loss.last_components["dice"].item() == pytest.approx(expected, rel=1e-6 if squared else 1e-10)


def test_invalid_parameters() -> None:
    with pytest.raises(ConfigError, match="parameter 'num_bins'"):
        build_loss("hardl1ace", num_bins=0)
    with pytest.raises(ConfigError, match="parameter 'empty_weight'"):
        build_loss("softl1ace", empty_weight=-0.1)
    with pytest.raises(ConfigError, match="parameter 'dice_weight'"):
        build_loss("softl1ace_dice", dice_weight=-1.0)
    with pytest.raises(ConfigError, match="unknown parameter"):
        build_loss("hardl1ace", empty_weight=0.01)  # soft binning only


def _exact_hard_bin(value: float, num_bins: int) -> int:
    """Smallest j with ``value <= (j + 1)(1 + EPS32)/num_bins``, in exact rational arithmetic."""
    from fractions import Fraction

    top = 1 + Fraction(1, 2**23)
    return next(j for j in range(num_bins) if Fraction(value) <= (j + 1) * top / num_bins)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_bins", [1, 2, 7, 20])
def test_hard_bins_are_right_closed_at_the_exact_edges(num_bins: int, dtype: torch.dtype) -> None:
    """Every probability at, just above and just below each edge ``j (1 + eps32) / bins`` (as
    rounded to the dtype, and the float32 values that are exactly an edge: 0.25 + 2^-25,
    0.5 + 2^-24) lands in the bin exact rational arithmetic gives; float32 exactly, float64 at
    1e-12 from an edge (the slot arithmetic is float64)."""
    from segcalib.losses._calibration_bins import binned_sums

    edges = torch.tensor([(j + 1) * (1 + EPS32) / num_bins for j in range(num_bins - 1)], dtype=dtype)
    if dtype == torch.float32:
        near = [edges, torch.nextafter(edges, torch.full_like(edges, 2.0)), torch.nextafter(edges, torch.zeros_like(edges))]
        exact = [0.25 + 2.0**-25, 0.5 + 2.0**-24]
    else:
        near = [edges + 1e-12, edges - 1e-12]
        exact = []
    gen = torch.Generator().manual_seed(46)
    values = torch.cat([*near, torch.tensor([0.0, 1.0, 2.0**-30, *exact], dtype=dtype), torch.rand(500, generator=gen, dtype=dtype)])
    # each probability is an image of one voxel and one class: its bin is the one with a count
    n = values.numel()
    _, _, counts = binned_sums(values.reshape(n, 1, 1), torch.zeros(n, 1, dtype=torch.long), -100, num_bins, False)
    assert torch.equal(counts.sum(-1), torch.ones(n, 1, dtype=torch.float64))
    expected = torch.tensor([_exact_hard_bin(value, num_bins) for value in values.tolist()])
    assert torch.equal(counts.reshape(n, num_bins).argmax(-1), expected)


@pytest.mark.parametrize("name", ["hardl1ace", "softl1ace"])
def test_chunked_binning_equals_one_chunk(name: str, monkeypatch) -> None:
    """Forward and backward of the torch path walk the voxels in chunks; a chunk of 7 entries
    (uneven split) gives the same value and gradient as a single chunk, ignored voxels included."""
    import segcalib.losses._calibration_bins as bins

    monkeypatch.setenv("SEGCALIB_NUMBA", "0")  # the torch path (the numba kernels have no chunks)

    logits, target = random_batch(SHAPES["3d"], dtype=torch.float64, seed=47)
    target[1, 2] = -100
    results = []
    for chunk in (bins.CHUNK_ELEMENTS, 7):
        monkeypatch.setattr(bins, "CHUNK_ELEMENTS", chunk)
        z = logits.clone().requires_grad_(True)
        value = build_loss(name)(z, target)
        value.backward()
        results.append((value.detach(), z.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-12, atol=1e-14)


def _bin_inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Probabilities ``(B, C, N)`` and labels ``(B, N)`` of a random batch (ignored voxels, -100, in
    image 0), and a fixed random weighting of the three bin sums."""
    logits, target = random_batch(SHAPES["3d"], dtype=dtype, seed=48)
    target[0, 1] = -100
    weights = torch.randn(3, 2, 3, 20, generator=torch.Generator().manual_seed(49), dtype=torch.float64)
    return logits.softmax(1).reshape(2, 3, -1), target.reshape(2, -1), weights


def _binned_sums_and_gradient(
    inputs: tuple[torch.Tensor, ...], soft: bool, from_logits: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The three bin sums and the gradient of their weighting with respect to the probabilities
    (``from_logits``: to the logits ``log p``, whose softmax the binning takes itself)."""
    from segcalib.losses._calibration_bins import binned_sums

    probs, labels, weights = inputs
    p = (probs.log() if from_logits else probs).clone().requires_grad_(True)
    sums = torch.stack(binned_sums(p, labels, -100, 20, soft, from_logits=from_logits))
    (sums * weights).sum().backward()
    return sums.detach(), p.grad


@pytest.mark.parametrize("path", ["torch", "numba"])
@pytest.mark.parametrize("soft", [False, True])
def test_bin_sums_are_the_same_bits_with_any_thread_count(soft: bool, path: str, monkeypatch) -> None:
    """The bin sums and their gradient are the same, bit for bit, with 1 and 3 threads: the torch
    path's chunks and the numba kernels' parts are split by size alone and summed in a fixed order.
    (Checked on the binning itself: torch's own softmax, forward and backward, differs by ~1e-8
    between thread counts.)"""
    import segcalib.losses._calibration_bins as bins

    if path == "numba":
        pytest.importorskip("numba")
        import segcalib.losses._calibration_bins_numba as kernels

        monkeypatch.setattr(kernels, "MIN_PART", 4)  # many parts, spread over the threads
    else:
        monkeypatch.setenv("SEGCALIB_NUMBA", "0")
        monkeypatch.setattr(bins, "CHUNK_ELEMENTS", 5)  # many chunks
    inputs = _bin_inputs()
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            results.append(_binned_sums_and_gradient(inputs, soft))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert results[0][1].abs().sum() > 0


@pytest.mark.parametrize("soft", [False, True])
def test_numba_logits_gradient_is_the_same_bits_with_any_thread_count(soft: bool, monkeypatch) -> None:
    """The fused gather + softmax backward of the kernels, on the same probabilities and slots, gives
    the same bits with 1 and 3 threads (each voxel's classes summed in class order)."""
    pytest.importorskip("numba")
    import segcalib.losses._calibration_bins_numba as kernels

    monkeypatch.setattr(kernels, "MIN_PART", 4)
    monkeypatch.setenv("SEGCALIB_NUMBA", "1")
    probs, labels, _ = _bin_inputs()
    from segcalib.losses._calibration_bins import _Chunks, slot_dtype

    chunks = _Chunks(probs, kernels.label_codes(labels, -100, 3), 20, soft)
    slots = torch.empty(probs.shape, dtype=slot_dtype(chunks.block))
    chunks.moments(slots)
    tables = torch.randn(2, 2, 3, 84, generator=torch.Generator().manual_seed(53))
    threads = torch.get_num_threads()
    grads = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            grads.append(torch.empty_like(probs))
            kernels.gather_logits(probs, slots, tables[0], tables[1] if soft else None, grads[-1])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0
    expected = tables[0].gather(-1, slots.long()) + (tables[1].gather(-1, slots.long()) * probs if soft else 0)
    expected = (expected - (expected * probs).sum(1, keepdim=True)) * probs
    torch.testing.assert_close(grads[0], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("soft", [False, True])
def test_numba_kernels_equal_the_torch_path(soft: bool, dtype: torch.dtype, from_logits: bool, monkeypatch) -> None:
    """With numba (the ``fast-cpu`` extra) the CPU bin sums come from compiled loops: the same slot
    for every voxel (so the same counts, exactly), sums and gradients equal to the torch path's up
    to the order of addition; ``from_logits``, the kernel's fused softmax backward equals torch's
    ``(g - sum_c p g) p``; ``SEGCALIB_NUMBA=0`` switches them off."""
    pytest.importorskip("numba")
    import segcalib.losses._calibration_bins_numba as kernels

    monkeypatch.setattr(kernels, "MIN_PART", 16)  # several parts per row, as on a real volume
    monkeypatch.setattr(kernels, "_TILE", 7)  # tiles that do not divide the parts
    kernels._kernels.cache_clear()  # recompiled with the small tile
    kernels._drivers.cache_clear()
    monkeypatch.setenv("SEGCALIB_NUMBA", "1")
    inputs = _bin_inputs(dtype)
    assert kernels.usable(inputs[0])
    try:
        fast = _binned_sums_and_gradient(inputs, soft, from_logits)
    finally:
        kernels._kernels.cache_clear()  # recompiled with the small tile
    kernels._drivers.cache_clear()
    monkeypatch.setenv("SEGCALIB_NUMBA", "0")
    assert not kernels.usable(inputs[0])
    plain = _binned_sums_and_gradient(inputs, soft, from_logits)
    if not soft:
        assert torch.equal(fast[0][2], plain[0][2])  # hard bin counts: every voxel in the same bin
    # float32 gradients: a few ulps apart (torch's addcmul fuses the multiply-add, the kernel does not;
    # from logits, g - sum_c p g cancels, so those ulps are of g, not of the difference: 2e-7 absolute)
    tol = {"rtol": 1e-12, "atol": 1e-15} if dtype == torch.float64 else {"rtol": 5e-6, "atol": 1e-9}
    if dtype == torch.float32 and from_logits:
        tol = {"rtol": 5e-6, "atol": 1e-6}
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-12, atol=1e-12)  # float64 sums either way
    torch.testing.assert_close(fast[1], plain[1], **tol)


def test_a_numba_that_does_not_import_falls_back_to_the_torch_path(monkeypatch, caplog) -> None:
    """numba installed but not importable (e.g. older than the installed NumPy): said once, and
    the loss runs on the torch path with the same value as the reference."""
    import importlib.util
    import sys

    import segcalib.losses._calibration_bins_numba as kernels

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: object() if name == "numba" else real_find_spec(name, *a, **k))
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` raises ImportError
    kernels._numba.cache_clear()
    try:
        with caplog.at_level("WARNING", logger=kernels.__name__):
            assert not kernels.available() and not kernels.available()
        assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["numba is installed but does not import"]
        logits, target = random_batch(SHAPES["2d"], dtype=torch.float64, seed=50)
        expected = reference_l1ace(logits, target)
        assert build_loss("hardl1ace")(logits, target).item() == pytest.approx(expected.item(), rel=1e-10)
    finally:
        kernels._numba.cache_clear()


@pytest.mark.parametrize("path", ["torch", "numba"])
@pytest.mark.parametrize("name", ["hardl1ace", "softl1ace"])
def test_nan_logits_give_a_nan_loss_on_either_path(name: str, path: str, monkeypatch) -> None:
    """A NaN probability must reach the loss (so that training stops on it), not vanish into a bin
    or be written out of bounds."""
    if path == "numba":
        pytest.importorskip("numba")
    monkeypatch.setenv("SEGCALIB_NUMBA", "1" if path == "numba" else "0")
    logits, target = random_batch((1, 3, 40, 40, 40), dtype=torch.float32, seed=51)
    logits[0, :, :5] = float("nan")
    assert math.isnan(build_loss(name)(logits, target).item())


def test_labels_outside_the_classes_are_refused(monkeypatch) -> None:
    """A label outside [0, C) that is not ignore_index is an error on both paths (numba: named, with
    the count; torch: index_select's), never a silent bin of another class."""
    pytest.importorskip("numba")
    logits, target = random_batch(SHAPES["3d"], dtype=torch.float64, seed=52)
    for bad in (7, -1):
        wrong = target.clone()
        wrong.view(-1)[0] = bad
        monkeypatch.setenv("SEGCALIB_NUMBA", "1")
        with pytest.raises(ValueError, match=r"L1-ACE: 1 label\(s\) outside \[0, 3\) that are not ignore_index \(-100\)"):
            build_loss("hardl1ace")(logits, wrong)
        monkeypatch.setenv("SEGCALIB_NUMBA", "0")
        with pytest.raises(IndexError):
            build_loss("hardl1ace")(logits, wrong)


@pytest.mark.parametrize("soft", [False, True])
def test_numba_kernels_run_on_one_thread_without_a_shared_threading_layer(soft: bool, monkeypatch, caplog) -> None:
    """numba's ``workqueue`` layer is neither shared with torch's OpenMP threads nor safe from several
    threads at once: then the kernels run serially on the calling thread, said once, with the same
    bits as on the parallel layer (the parts depend on the row's length alone)."""
    numba = pytest.importorskip("numba")
    import segcalib.losses._calibration_bins_numba as kernels

    monkeypatch.setattr(kernels, "MIN_PART", 16)
    monkeypatch.setenv("SEGCALIB_NUMBA", "1")
    inputs = _bin_inputs()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kernels._parallel.cache_clear()
        assert kernels._parallel() == (numba.threading_layer() in kernels._PARALLEL_LAYERS)
        if not {"NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY"} & set(os.environ):
            assert numba.threading_layer() == "omp"  # the OpenMP runtime torch loaded, tried first
        parallel = _binned_sums_and_gradient(inputs, soft, from_logits=True)
        monkeypatch.setattr(numba, "threading_layer", lambda: "workqueue")
        kernels._parallel.cache_clear()
        with caplog.at_level("INFO", logger=kernels.__name__):
            serial = _binned_sums_and_gradient(inputs, soft, from_logits=True)
            _binned_sums_and_gradient(inputs, soft, from_logits=True)
        assert [r.getMessage() for r in caplog.records] == [
            "numba's threading layer is workqueue; the L1-ACE kernels run on one thread"
        ]
    finally:
        torch.set_num_threads(threads)
        kernels._parallel.cache_clear()
    assert torch.equal(parallel[0], serial[0]) and torch.equal(parallel[1], serial[1])
