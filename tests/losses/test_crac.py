"""CRaC: class- and region-wise constraints, multipliers per (region, class), outer update, state, DDP.

The float64 reference below re-derives the reference code's (Bala93/CRac) formulation with the
regions of segcalib's metrics: explicit window counting for tau, scipy's erosion and distance
transform for the boundary band, the region-masked constraint matrix ``[h * b, h * (1 - b)]`` of
shape (M, 2C) and its plain means for the multiplier update (segcalib sums per region instead).
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import ndimage

from segcalib.errors import ConfigError
from segcalib.losses import build_loss
from segcalib.losses._penalties import PENALTIES
from segcalib.losses.crac import neighbour_proportions
from tests.losses import _reference as ref
from tests.losses._helpers import SHAPES

IGNORE = -100


def band(y: np.ndarray, spacing, width: float, ignore_index: int = IGNORE) -> np.ndarray:
    """(B, *S) bool: within ``width`` mm of an edge voxel of a foreground class (SPEC §3), valid voxels."""
    out = np.zeros(y.shape, dtype=bool)
    for b in range(y.shape[0]):
        cross = ndimage.generate_binary_structure(y[b].ndim, 1)
        edges = np.zeros(y[b].shape, dtype=bool)
        for k in set(np.unique(y[b]).tolist()) - {0, ignore_index}:
            mask = y[b] == k
            edges |= mask & ~ndimage.binary_erosion(mask, cross, border_value=0)
        if edges.any():
            out[b] = ndimage.distance_transform_edt(~edges, sampling=spacing) <= width
    return out & (y != ignore_index)


def window_shares(y: np.ndarray, classes: int, k: int = 3, ignore_index: int = IGNORE) -> np.ndarray:
    """(B, C, *S): class shares in the k^d window; outside the image counts as class 0, ignored as none."""
    tau = np.zeros((y.shape[0], classes, *y.shape[1:]))
    r = k // 2
    for b in range(y.shape[0]):
        for idx in np.ndindex(y[b].shape):
            for offset in np.ndindex((k,) * y[b].ndim):
                where = tuple(i + o - r for i, o in zip(idx, offset))
                inside = all(0 <= w < n for w, n in zip(where, y[b].shape))
                label = y[b][where] if inside else 0
                if label != ignore_index:
                    tau[(b, label, *idx)] += 1.0 / k ** y[b].ndim
    return tau


def mixed_windows(y: np.ndarray, k: int = 3, ignore_index: int = IGNORE) -> np.ndarray:
    """(B, *S) bool: the k^d window holds a label other than the voxel's (outside = 0, ignored = other)."""
    out = np.zeros(y.shape, dtype=bool)
    padded = np.pad(y, [(0, 0)] + [(k // 2, k // 2)] * (y.ndim - 1), constant_values=0)
    for idx in np.ndindex(y.shape):
        window = padded[(idx[0], *[slice(i, i + k) for i in idx[1:]])]
        out[idx] = y[idx] != ignore_index and bool((window != y[idx]).any())
    return out


def constraints(z: np.ndarray, y: np.ndarray, margin: float, spacing, width: float, region: str = "band"):
    """h (M, C) and the boundary flag (M,) of every voxel (ignored ones included, masked later)."""
    classes = z.shape[1]
    boundary = band(y, spacing, width) if region == "band" else mixed_windows(y)
    tau = window_shares(y, classes)
    goal = np.where(boundary[:, None], tau, margin * tau)
    return ref.flat(np.abs(goal - z)), boundary.reshape(-1)


def reference_loss(z, y, lambdas, rhos, margin=5.0, penalty="phr", spacing=None, width=2.0, region="band") -> float:
    """CE + mean over valid voxels x 2C of P([h b, h (1 - b)]; lambda, rho) (lambdas, rhos (2, C))."""
    spacing = spacing or (1.0,) * (z.ndim - 2)
    h, b = constraints(z, y, margin, spacing, width, region)
    hcat = np.concatenate([h * b[:, None], h * (1 - b[:, None])], axis=1)
    p, _ = ref.penalty_and_derivative(penalty, hcat, lambdas.reshape(1, -1), rhos.reshape(1, -1))
    valid = y.reshape(-1) != IGNORE
    return ref.ce(z, y) + float(p[valid].sum() / (max(valid.sum(), 1) * hcat.shape[1]))


def reference_updates(epochs, classes, margin=5.0, penalty="phr", lambda_min=1e-6, lambda_max=1e6, lambda_step=1,
                      rho_init=0.1, rho_max=10.0, rho_step=10, gamma=1.2, tau=0.9, spacing=None, width=2.0):
    """The reference code's outer update: per epoch, P' of the masked (M, 2C) constraints clamped and
    averaged over every valid validation voxel, c = mean of the masked constraints, rho schedule."""
    lam = np.full(2 * classes, lambda_min)
    rho = np.full(2 * classes, rho_init)
    previous = None
    history = []
    for epoch, batches in enumerate(epochs, start=1):
        rows = []
        for z, y in batches:
            h, b = constraints(z, y, margin, spacing or (1.0,) * (z.ndim - 2), width)
            valid = y.reshape(-1) != IGNORE
            rows.append(np.concatenate([h * b[:, None], h * (1 - b[:, None])], axis=1)[valid])
        hcat = np.concatenate(rows)
        _, slope = ref.penalty_and_derivative(penalty, hcat, lam[None, :], rho[None, :])
        new_lam = np.clip(np.clip(slope, lambda_min, lambda_max).mean(axis=0), lambda_min, lambda_max)
        current = hcat.mean(axis=0)
        if epoch % lambda_step == 0:
            lam = new_lam
        if rho_step > 0 and epoch % rho_step == 0 and previous is not None:
            rho = np.clip(np.where(current > tau * np.maximum(previous, 0), gamma * rho, rho), rho_init, rho_max)
        previous = current
        history.append((lam.reshape(2, classes).copy(), rho.reshape(2, classes).copy(), current.reshape(2, classes)))
    return history


def _blob_batch(shape, seed: int, classes: int = 3, scale: float = 3.0):
    """Logits and a label map with compact blobs (so that boundary and interior are both populated)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    spatial = shape[2:]
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in spatial], indexing="ij")
    target = torch.zeros((shape[0], *spatial), dtype=torch.long)
    for b in range(shape[0]):
        centre = [float(torch.randint(0, n, (1,), generator=gen)) for n in spatial]
        dist2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
        target[b][dist2 <= (min(spatial) / 2) ** 2] = 1
        target[b][dist2 <= (min(spatial) / 4) ** 2] = classes - 1
    return logits, target


BLOB_SHAPES = {"2d": (2, 3, 9, 10), "3d": (2, 3, 7, 8, 6)}


# -- regions and training loss -------------------------------------------------------------------


def test_loss_by_hand() -> None:
    # 1 x 3 image, labels (0, 0, 1), boundary_mm = 1: the edge voxel is voxel 2, the band {1, 2}.
    # tau (3x3 window, outside = class 0): v0 (1, 0), v1 (8/9, 1/9), v2 (8/9, 1/9).
    # z = (2, 0), (0, 0), (0, 1); m = 5: h(v0, interior) = |(5, 0) - (2, 0)| = (3, 0);
    # h(v1) = (8/9, 1/9); h(v2) = |(8/9, 1/9) - (0, 1)| = (8/9, 8/9).
    # PHR with h >= 0: P = lam h + rho h^2 / 2; boundary lam (0.5, 0.25), interior (1, 2), rho = 2:
    # v0: 3 + 9 = 12; v1: 100/81 + 13/324; v2: 100/81 + 82/81 -> sum 12 + 1141/324, over 2C * M = 12.
    loss = build_loss("crac", num_classes=2, boundary_mm=1.0)
    loss.lambdas.copy_(torch.tensor([[0.5, 0.25], [1.0, 2.0]]))
    loss.rhos.fill_(2.0)
    z = torch.tensor([[[[2.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]]]], dtype=torch.float64)
    y = torch.tensor([[[0, 0, 1]]])
    penalty = (12 + 1141 / 324) / 12
    ce = (math.log(1 + math.exp(-2)) + math.log(2) + math.log(1 + math.exp(-1))) / 3
    assert loss(z, y).item() == pytest.approx(ce + penalty, rel=1e-12)
    assert loss.last_components["penalty"].item() == pytest.approx(penalty, rel=1e-12)
    assert loss.regions(_inputs(z, y)).tolist() == [[[False, True, True]]]


def _inputs(z, y):
    from segcalib.losses._inputs import LossInputs

    return LossInputs(z, y, IGNORE)


@pytest.mark.parametrize("penalty", sorted(PENALTIES))
@pytest.mark.parametrize("dims", sorted(BLOB_SHAPES))
def test_loss_matches_the_float64_reference(penalty: str, dims: str) -> None:
    logits, target = _blob_batch(BLOB_SHAPES[dims], seed=51)
    target[1, 0] = IGNORE  # ignored voxels: out of every term, next to foreground edges
    spacing = (1.0, 0.7) if dims == "2d" else (1.5, 1.0, 0.8)
    lambdas = np.array([[0.2, 1.0, 3.0], [0.5, 0.1, 2.0]])
    rhos = np.array([[1.0, 2.5, 5.0], [0.3, 1.0, 4.0]])
    loss = build_loss("crac", num_classes=3, penalty=penalty, spacing=list(spacing), boundary_mm=1.6)
    loss.lambdas.copy_(torch.from_numpy(lambdas))
    loss.rhos.copy_(torch.from_numpy(rhos))
    expected = reference_loss(
        logits.numpy(), target.numpy(), loss.lambdas.double().numpy(), loss.rhos.double().numpy(),
        penalty=penalty, spacing=spacing, width=1.6,
    )
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-10)
    boundary = loss.regions(_inputs(logits, target)).numpy()
    assert np.array_equal(boundary, band(target.numpy(), spacing, 1.6))
    assert boundary.any() and (~boundary & (target.numpy() != IGNORE)).any()


def test_phr_shortcut_follows_the_multipliers_wherever_they_change() -> None:
    """PHR is computed as ``lam h + rho h^2 / 2`` only while every lambda >= 0 and rho > 0; the check
    is cached per multiplier tensor and version, so in-place edits, ``load_state_dict`` and a
    replaced buffer must each be seen."""
    logits, target = _blob_batch(BLOB_SHAPES["3d"], seed=61)
    z, y = logits.numpy(), target.numpy()
    loss = build_loss("crac", num_classes=3, boundary_mm=1.5)
    h, b = constraints(z, y, 5.0, (1.0, 1.0, 1.0), 1.5)

    def check() -> None:
        # P of each voxel's own region's entries (with lambda < 0 the reference's other-region
        # entries would add P(0) = -lambda^2 / (2 rho), which segcalib leaves out)
        lambdas, rhos = loss.lambdas.double().numpy(), loss.rhos.double().numpy()
        own = b[:, None]
        lam, rho = np.where(own, lambdas[0], lambdas[1]), np.where(own, rhos[0], rhos[1])
        p, _ = ref.penalty_and_derivative("phr", h, lam, rho)
        expected = ref.ce(z, y) + p.sum() / (h.shape[0] * 2 * 3)
        assert loss(logits, target).item() == pytest.approx(expected, rel=1e-10)

    check()
    assert loss._fast_penalty()
    loss.lambdas = torch.tensor([[-2.0, 1.0, 0.5], [0.4, -0.7, 2.0]])  # a new buffer (of the same version, 0)
    check()
    assert not loss._fast_penalty()
    state = {**loss.state_dict(), "lambdas": torch.tensor([[0.3, 1.0, 0.5], [0.4, 0.7, 2.0]])}
    loss.load_state_dict(state)
    check()
    assert loss._fast_penalty()
    loss.lambdas.copy_(torch.tensor([[0.3, -1.0, 0.5], [0.4, 0.7, 2.0]]))  # in place
    check()
    assert not loss._fast_penalty()


@pytest.mark.parametrize("dims", sorted(BLOB_SHAPES))
def test_window_regions_match_the_reference(dims: str) -> None:
    """``region="window"``: the paper's boundary, a window holding more than one label."""
    logits, target = _blob_batch(BLOB_SHAPES[dims], seed=59)
    target[0, 1] = IGNORE
    loss = build_loss("crac", num_classes=3, region="window")
    loss.lambdas.copy_(torch.tensor([[0.3, 1.0, 2.0], [0.5, 0.2, 1.0]]))
    loss.rhos.copy_(torch.tensor([[1.0, 2.0, 0.5], [0.7, 1.0, 3.0]]))
    boundary = loss.regions(_inputs(logits, target)).numpy()
    assert np.array_equal(boundary, mixed_windows(target.numpy()))
    assert boundary.any() and (~boundary & (target.numpy() != IGNORE)).any()
    expected = reference_loss(
        logits.numpy(), target.numpy(), loss.lambdas.double().numpy(), loss.rhos.double().numpy(), region="window"
    )
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("dims,penalty", [("2d", "phr"), ("2d", "p2"), ("2d", "p3"), ("3d", "phr")])
def test_gradient_by_finite_differences(dims: str, penalty: str) -> None:
    shape = (1, 3, 5, 6) if dims == "2d" else (1, 3, 4, 5, 4)
    logits, target = _blob_batch(shape, seed=52, scale=1.0)
    loss = build_loss("crac", num_classes=3, penalty=penalty, boundary_mm=1.0)
    loss.lambdas.copy_(torch.tensor([[0.5, 1.0, 2.0], [0.2, 0.7, 1.5]]))
    loss.rhos.fill_(1.5)
    z = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: loss(x, target), (z,), eps=1e-6, atol=1e-6)
    value = loss(z, target)
    value.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize("penalty", ["phr", "p2"])
def test_chunked_values_and_gradients_equal_one_chunk(penalty: str, monkeypatch) -> None:
    """With one intra-op thread the CPU path splits every sample into chunks of voxels: tiny chunks
    (several per sample, the last one shorter) give the loss and gradient of one chunk per batch
    (several threads), with ignored voxels, and a scaled backward (``2 * loss``) doubles the gradient."""
    import segcalib.losses._constrained_ce as fused

    logits, target = _blob_batch(BLOB_SHAPES["3d"], seed=60)
    target[0, 1] = IGNORE
    loss = build_loss("crac", num_classes=3, penalty=penalty, boundary_mm=1.5)
    loss.lambdas.copy_(torch.tensor([[0.3, 1.0, 2.0], [0.5, 0.2, 1.0]]))
    loss.rhos.copy_(torch.tensor([[1.0, 2.0, 0.5], [0.7, 1.0, 3.0]]))

    def value_and_grad(scale: float):
        z = logits.clone().requires_grad_(True)
        value = loss(z, target)
        (scale * value).backward()
        return value.detach(), z.grad, loss.last_components["penalty"]

    assert len(fused._chunks([logits.reshape(2, 3, -1)], 336, 3, logits.device)) == 2  # a sample per chunk
    whole = value_and_grad(1.0)
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 3 * 50)  # 50 of a sample's 336 voxels per chunk
    assert len(fused._chunks([logits.reshape(2, 3, -1)], 336, 3, logits.device)) == 2 * 7
    chunked = value_and_grad(1.0)
    doubled = value_and_grad(2.0)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(doubled[1], 2 * whole[1], rtol=1e-12, atol=1e-15)
    assert (whole[1][0, :, 1] == 0).all() and (whole[1][1] != 0).all()  # ignored voxels (only): no gradient


def test_empty_boundary_is_all_interior() -> None:
    # Background only: no edge voxel, no band; every voxel has h = |m * onehot - z|.
    logits, _ = _blob_batch(SHAPES["3d"], seed=53)
    target = torch.zeros((2, 4, 5, 3), dtype=torch.long)
    loss = build_loss("crac", num_classes=3)
    lambdas, rhos = loss.lambdas.double().numpy(), loss.rhos.double().numpy()
    assert not loss.regions(_inputs(logits, target)).any()
    expected = reference_loss(logits.numpy(), target.numpy(), lambdas, rhos)
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-10)
    # the boundary multipliers cannot move: every voxel contributes P'(0) = lambda (PHR)
    loss.accumulate(logits, target)
    loss.step()
    assert torch.equal(loss.lambdas[0], torch.full((3,), 1e-6))
    assert (loss.lambdas[1] > 1e-6).all()


# -- outer update --------------------------------------------------------------------------------


def test_two_epoch_update_by_hand() -> None:
    # The image of test_loss_by_hand; defaults lambda = 1e-6, rho = 0.1, rho_step = 1 here; N = 3 voxels.
    # Epoch 1, PHR P'(h) = lam + rho h: boundary (v1, v2) class 0: h = 8/9 twice; v0 adds P'(0) = 1e-6
    #   -> lambda = 1e-6 + 1.6/27; class 1: h = 1/9, 8/9 -> 1e-6 + 0.1/3;
    #   interior (v0) class 0: h = 3 -> 1e-6 + 0.1; class 1: h = 0 -> 1e-6.
    #   c = (16/27, 1/3; 1, 0).
    # Epoch 2, v0 logits (1, 0): interior class 0 h = 4 -> lambda = (1e-6 + 0.4 + 2e-6) / 3 ... with the old
    #   lambda a = 1e-6 + 0.1 for all three voxels' slopes: (a + 0.4 + 2a) / 3 = a + 0.4/3;
    #   boundary class 0: (2 (a0 + 0.8/9) + a0) / 3 = a0 + 1.6/27 with a0 = 1e-6 + 1.6/27.
    #   c = (16/27, 1/3; 4/3, 0): grows where c > 0.9 max(c_prev, 0): all but interior class 1 -> rho 0.12.
    loss = build_loss("crac", num_classes=2, boundary_mm=1.0, rho_step=1)
    y = torch.tensor([[[0, 0, 1]]])
    loss.accumulate(torch.tensor([[[[2.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]]]], dtype=torch.float64), y)
    loss.step()
    a0, a1 = 1e-6 + 1.6 / 27, 1e-6 + 0.1 / 3
    torch.testing.assert_close(loss.lambdas, torch.tensor([[a0, a1], [1e-6 + 0.1, 1e-6]]))
    torch.testing.assert_close(loss.previous_constraint, torch.tensor([[16 / 27, 1 / 3], [1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(loss.rhos, torch.full((2, 2), 0.1))
    loss.accumulate(torch.tensor([[[[1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]]]], dtype=torch.float64), y.unsqueeze(1))
    loss.step()
    a = 1e-6 + 0.1
    expected = [[a0 + 1.6 / 27, a1 + 0.1 / 3], [a + 0.4 / 3, 1e-6]]
    torch.testing.assert_close(loss.lambdas, torch.tensor(expected))
    torch.testing.assert_close(loss.rhos, torch.tensor([[0.12, 0.12], [0.12, 0.1]]))
    assert int(loss.epoch) == 2


def _validation_epochs(n_epochs: int, n_batches: int, seed: int, dims: str = "3d"):
    return [
        [_blob_batch(BLOB_SHAPES[dims], seed=seed + 100 * e + b, scale=2.0 + e) for b in range(n_batches)]
        for e in range(n_epochs)
    ]


@pytest.mark.parametrize("penalty", sorted(PENALTIES))
@pytest.mark.parametrize("dims", sorted(BLOB_SHAPES))
def test_three_epochs_match_the_reference(penalty: str, dims: str) -> None:
    params = dict(margin=3.0, penalty=penalty, rho_step=1, tau=0.5, gamma=1.3, rho_init=0.5, boundary_mm=1.5)
    epochs = _validation_epochs(3, 2, seed=54, dims=dims)
    for batches in epochs:
        batches[0][1][0, 0] = IGNORE
    loss = build_loss("crac", num_classes=3, **params)
    history = reference_updates(
        [[(z.numpy(), y.numpy()) for z, y in batches] for batches in epochs], 3,
        **{k: v for k, v in params.items() if k != "boundary_mm"}, width=1.5,
    )
    grew = False
    for batches, (lam, rho, c) in zip(epochs, history):
        for z, y in batches:
            loss.accumulate(z, y)
        loss.step()
        np.testing.assert_allclose(loss.previous_constraint.numpy(), c, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(loss.lambdas.numpy(), lam, rtol=1e-6)  # float32 state
        np.testing.assert_allclose(loss.rhos.numpy(), rho, rtol=1e-6)
        grew |= bool((loss.rhos > 0.5).any())
    assert grew, "the sequence should exercise the rho update"
    assert (loss.lambdas[0] != loss.lambdas[1]).any(), "boundary and interior multipliers should differ"


def test_update_schedule_defaults() -> None:
    # rho_step = 10 by default: rho stays at 0.1 for nine epochs, may grow at the tenth.
    loss = build_loss("crac", num_classes=3)
    z, y = _blob_batch(BLOB_SHAPES["2d"], seed=55, scale=10.0)
    for epoch in range(1, 11):
        loss.accumulate(z * epoch, y)  # constraints grow every epoch
        loss.step()
        if epoch < 10:
            assert torch.equal(loss.rhos, torch.full((2, 3), 0.1))
    assert (loss.rhos > 0.1).all()


def test_accumulate_needs_labels() -> None:
    loss = build_loss("crac", num_classes=3)
    with pytest.raises(ValueError, match="validation labels"):
        loss.accumulate(torch.zeros(1, 3, 4, 4))
    with pytest.raises(RuntimeError, match="accumulate"):
        loss.step()


def test_state_dict_round_trip() -> None:
    loss = build_loss("crac", num_classes=3, rho_step=1)
    for batches in _validation_epochs(3, 1, seed=56):
        for z, y in batches:
            loss.accumulate(z, y)
        loss.step()
    state = loss.state_dict()
    assert set(state) == {"lambdas", "rhos", "previous_constraint", "epoch"}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = build_loss("crac", num_classes=3, rho_step=1)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    z, y = _blob_batch(BLOB_SHAPES["3d"], seed=57)
    assert torch.equal(restored(z, y), loss(z, y))
    for module in (loss, restored):
        module.accumulate(z, y)
        module.step()
    assert torch.equal(restored.lambdas, loss.lambdas) and torch.equal(restored.rhos, loss.rhos)
    assert int(restored.epoch) == 4
    row = loss.logged_state()
    assert row["lambda_boundary_2"] == pytest.approx(float(loss.lambdas[0, 2]))
    assert row["rho_interior_0"] == pytest.approx(float(loss.rhos[1, 0]))


def test_invalid_parameters() -> None:
    with pytest.raises(ConfigError, match="parameter 'spacing'"):
        build_loss("crac", num_classes=3, spacing=[1.0])
    with pytest.raises(ConfigError, match="parameter 'spacing'"):
        build_loss("crac", num_classes=3, spacing=[1.0, 0.0])
    with pytest.raises(ConfigError, match="parameter 'kernel_size'"):
        build_loss("crac", num_classes=3, kernel_size=2)
    with pytest.raises(ConfigError, match="missing required parameter 'num_classes'"):
        build_loss("crac")
    loss = build_loss("crac", num_classes=3, spacing=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="spacing"):
        loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="4 classes"):
        build_loss("crac", num_classes=4)(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))


# -- two processes (gloo) ------------------------------------------------------------------------


def _ddp_worker(rank: int, init_file: str, out_dir: str, params: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        loss = build_loss("crac", num_classes=3, **params)
        for batches in _validation_epochs(3, 3, seed=58):
            mine = batches[:2] if rank == 0 else batches[2:]  # unequal halves: 2 batches and 1
            for z, y in mine:
                loss.accumulate(z, y)
            loss.step()
        torch.save({k: v.clone() for k, v in loss.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_update_equals_single_process(tmp_path) -> None:
    params = dict(margin=3.0, rho_step=1, tau=0.5)
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path), params), nprocs=2, join=True)
    single = build_loss("crac", num_classes=3, **params)
    for batches in _validation_epochs(3, 3, seed=58):
        for z, y in batches:
            single.accumulate(z, y)
        single.step()
    assert (single.rhos > 0.1).any(), "the sequence should exercise the rho update"
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(state["lambdas"], single.lambdas, rtol=1e-6, atol=0)
        torch.testing.assert_close(state["rhos"], single.rhos, rtol=1e-6, atol=0)
        torch.testing.assert_close(state["previous_constraint"], single.previous_constraint, rtol=1e-12, atol=1e-15)


def test_bfloat16_neighbour_proportions_round_the_float32_ones() -> None:
    # avg_pool3d has no bfloat16 CPU kernel: the shares are summed in float32, then rounded once
    labels = torch.randint(0, 3, (2, 6, 5, 7), generator=torch.Generator().manual_seed(3))
    valid = labels != 2
    shares = neighbour_proportions(labels, valid, 3, 3, torch.bfloat16)
    assert shares.dtype == torch.bfloat16
    assert torch.equal(shares, neighbour_proportions(labels, valid, 3, 3, torch.float32).to(torch.bfloat16))
