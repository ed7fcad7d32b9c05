"""CALS (SPEC §2): penalty functions, training loss, outer update, state, DDP; the heuristic variant."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segcalib.errors import ConfigError
from segcalib.losses import build_loss
from segcalib.losses._penalties import PENALTIES
from tests.losses import _reference as ref
from tests.losses._helpers import SHAPES, random_batch

H = [-2.0, -1.0, -0.5, 0.0, 0.3, 1.5]
# lambda = 0.5, rho = 2, derived by hand from SPEC §2:
# PHR: x = 0.5 + 2h = (-3.5, -1.5, -0.5, 0.5, 1.1, 3.5); x < 0 -> P = -0.25/4, P' = 0;
#      else P = (x^2 - 0.25)/4: h=0 -> 0, h=0.3 -> (1.21-0.25)/4 = 0.24, h=1.5 -> (12.25-0.25)/4 = 3
# P2, h < 0: P = 0.5h/(1-2h) = (-1/5, -1/6, -1/8), P' = 0.5/(1-2h)^2 = (1/50, 1/18, 1/8)
#     h >= 0: P = 0.5h + h^2 + (2/3)h^3 = (0, 0.15+0.09+0.018, 0.75+2.25+2.25); P' = 0.5 + 2h + 2h^2 = (0.5, 1.28, 8)
# P3, h < 0 as P2; h >= 0: P = 0.5h + h^2 = (0, 0.24, 3), P' = 0.5 + 2h = (0.5, 1.1, 3.5)
TABLE = {
    "phr": ([-0.0625, -0.0625, -0.0625, 0.0, 0.24, 3.0], [0.0, 0.0, 0.0, 0.5, 1.1, 3.5]),
    "p2": ([-0.2, -1 / 6, -0.125, 0.0, 0.258, 5.25], [0.02, 1 / 18, 0.125, 0.5, 1.28, 8.0]),
    "p3": ([-0.2, -1 / 6, -0.125, 0.0, 0.24, 3.0], [0.02, 1 / 18, 0.125, 0.5, 1.1, 3.5]),
}


@pytest.mark.parametrize("kind", sorted(TABLE))
def test_penalty_table(kind: str) -> None:
    h = torch.tensor(H, dtype=torch.float64)
    lam, rho = torch.tensor(0.5, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    value = PENALTIES[kind].value(h.clone(), lam, rho)
    slope = PENALTIES[kind].derivative(h.clone(), lam, rho)
    expected_value, expected_slope = TABLE[kind]
    torch.testing.assert_close(value, torch.tensor(expected_value, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(slope, torch.tensor(expected_slope, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    np_value, np_slope = ref.penalty_and_derivative(kind, H, 0.5, 2.0)
    np.testing.assert_allclose(np_value, expected_value, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np_slope, expected_slope, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", sorted(PENALTIES))
def test_penalty_derivative_is_the_derivative(kind: str) -> None:
    """P' against autograd of P and against the float64 reference, for several lambda, rho."""
    gen = torch.Generator().manual_seed(0)
    h = (torch.rand(200, generator=gen, dtype=torch.float64) - 0.5) * 6
    lam = torch.rand(200, generator=gen, dtype=torch.float64) * 3
    rho = 0.5 + torch.rand(200, generator=gen, dtype=torch.float64) * 5
    x = h.clone().requires_grad_(True)
    PENALTIES[kind].value(x * 1.0, lam, rho).sum().backward()
    slope = PENALTIES[kind].derivative(h.clone(), lam, rho)
    torch.testing.assert_close(slope, x.grad, rtol=1e-10, atol=1e-12)
    np_value, np_slope = ref.penalty_and_derivative(kind, h.numpy(), lam.numpy(), rho.numpy())
    np.testing.assert_allclose(PENALTIES[kind].value(h.clone(), lam, rho).numpy(), np_value, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(slope.numpy(), np_slope, rtol=1e-12, atol=1e-14)


def test_cals_loss_by_hand() -> None:
    # z = (10, 2, -5), y = 0, m = 4, normalised: d = (0, 8, 15), h = (d - 4)/4 = (-1, 1, 2.75)
    # lambda = 0.5, rho = 2 (PHR): x = 0.5 + 2h = (-1.5, 2.5, 6) -> P = (-0.0625, 1.5, 8.9375); mean = 10.375/3
    loss = build_loss("cals", num_classes=3, margin=4.0)
    loss.lambdas.fill_(0.5)
    loss.rhos.fill_(2.0)
    logits = torch.tensor([10.0, 2.0, -5.0], dtype=torch.float64).reshape(1, 3, 1, 1)
    value = loss(logits, torch.zeros(1, 1, 1, dtype=torch.long))
    ce = math.log(1 + math.exp(-8) + math.exp(-15))
    assert value.item() == pytest.approx(ce + 10.375 / 3, rel=1e-12)
    assert loss.last_components["penalty"].item() == pytest.approx(10.375 / 3, rel=1e-12)


@pytest.mark.parametrize("penalty", sorted(PENALTIES))
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dims", sorted(SHAPES))
def test_cals_matches_float64_reference(penalty: str, normalize: bool, dims: str) -> None:
    logits, target = random_batch(SHAPES[dims], dtype=torch.float64, seed=31)
    target[0, 0] = -100
    lambdas = np.array([0.2, 1.0, 3.0])
    rhos = np.array([1.0, 2.5, 5.0])
    loss = build_loss("cals", num_classes=3, margin=3.0, penalty=penalty, normalize=normalize)
    loss.lambdas.copy_(torch.from_numpy(lambdas))
    loss.rhos.copy_(torch.from_numpy(rhos))
    expected = ref.cals(logits.numpy(), target.numpy(), lambdas, rhos, 3.0, penalty, normalize)
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-6)  # lambdas, rhos are float32 state
    # against the float64 reference fed the float32-rounded multipliers: exact to float64
    expected64 = ref.cals(
        logits.numpy(), target.numpy(), loss.lambdas.double().numpy(), loss.rhos.double().numpy(), 3.0, penalty, normalize
    )
    assert loss(logits, target).item() == pytest.approx(expected64, rel=1e-10)


def _two_voxels(first_logits):
    """(1, 2, 1, 2): voxel 1 logits ``first_logits``, voxel 2 logits (0, 1)."""
    return torch.tensor([[[[first_logits[0], 0.0]], [[first_logits[1], 1.0]]]])


def test_two_epoch_outer_update_by_hand() -> None:
    # C = 2, m = 2, normalised, PHR, rho_step = 1, lambda_min = 1e-6 (the initial lambda), rho_init = 1.
    loss = build_loss("cals", num_classes=2, margin=2.0, rho_step=1)
    # Epoch 1, logits (4, 0) and (0, 1): d = (0, 4), (1, 0) -> h = (-1, 1), (-0.5, -1).
    #   P' = max(1e-6 + h, 0): class 0: (0, 0) -> clamped (1e-6, 1e-6) -> lambda_0 = 1e-6
    #                          class 1: (1 + 1e-6, 0) -> (1 + 1e-6, 1e-6) -> lambda_1 = 0.5 + 1e-6
    #   c = mean h = (-0.75, 0); no previous c -> rho stays (1, 1)
    loss.accumulate(_two_voxels((4.0, 0.0)))
    loss.step()
    torch.testing.assert_close(loss.lambdas, torch.tensor([1e-6, 0.5 + 1e-6]))
    torch.testing.assert_close(loss.rhos, torch.tensor([1.0, 1.0]))
    assert int(loss.epoch) == 1
    # Epoch 2, logits (6, 0) and (0, 1): h = (-1, 2), (-0.5, -1).
    #   lambda with the old rho = 1: class 1: max(0.500001 + 2, 0) = 2.500001 and 1e-6 -> mean 1.250001
    #   (with the new rho 1.2 it would be (2.900001 + 1e-6)/2 = 1.450001)
    #   c = (-0.75, 0.5); c_prev = (-0.75, 0): class 1: 0.5 > 0.9 * max(0, 0) -> rho_1 = 1.2; class 0 stays
    loss.accumulate(_two_voxels((6.0, 0.0)))
    loss.step()
    torch.testing.assert_close(loss.lambdas, torch.tensor([1e-6, 1.250001]))
    torch.testing.assert_close(loss.rhos, torch.tensor([1.0, 1.2]))
    torch.testing.assert_close(loss.previous_constraint, torch.tensor([-0.75, 0.5], dtype=torch.float64))
    assert int(loss.epoch) == 2


def _validation_epochs(n_epochs: int, n_batches: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(2, 3, 4, 5, 3, generator=gen) * (2 + epoch) for _ in range(n_batches)] for epoch in range(n_epochs)]


@pytest.mark.parametrize("penalty", sorted(PENALTIES))
def test_outer_update_matches_reference(penalty: str) -> None:
    params = dict(margin=2.0, penalty=penalty, lambda_step=2, rho_step=2, rho_max=1.5, tau=0.5, gamma=1.3)
    epochs = _validation_epochs(6, 3, seed=32)
    loss = build_loss("cals", num_classes=3, **params)
    history = ref.cals_outer_update([[b.double().numpy() for b in batches] for batches in epochs], 3, **params)
    grew = False
    for batches, (lam, rho) in zip(epochs, history):
        for batch in batches:
            loss.accumulate(batch)
        loss.step()
        np.testing.assert_allclose(loss.lambdas.numpy(), lam, rtol=2e-6)
        np.testing.assert_allclose(loss.rhos.numpy(), rho, rtol=1e-6)
        grew |= bool((loss.rhos > 1.0).any())
    assert grew, "the sequence should exercise the rho update"
    assert int(loss.epoch) == 6


def test_accumulate_accepts_half_precision_and_ignores_autocast() -> None:
    logits = _validation_epochs(1, 1, seed=33)[0][0]
    a = build_loss("cals", num_classes=3, margin=2.0)
    b = build_loss("cals", num_classes=3, margin=2.0)
    a.accumulate(logits.bfloat16().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b.accumulate(logits.bfloat16())
    a.step()
    b.step()
    torch.testing.assert_close(a.lambdas, b.lambdas)


def test_state_dict_round_trip() -> None:
    loss = build_loss("cals", num_classes=3, margin=2.0, rho_step=1)
    for batches in _validation_epochs(3, 2, seed=34):
        for batch in batches:
            loss.accumulate(batch)
        loss.step()
    state = loss.state_dict()
    assert set(state) == {"lambdas", "rhos", "previous_constraint", "epoch"}
    restored = build_loss("cals", num_classes=3, margin=2.0, rho_step=1)
    restored.load_state_dict(state)
    for key in state:
        assert torch.equal(restored.state_dict()[key], state[key])
    # both continue identically
    logits, target = random_batch(SHAPES["3d"], seed=35)
    assert torch.equal(restored(logits, target), loss(logits, target))
    batch = _validation_epochs(1, 1, seed=36)[0][0]
    for module in (loss, restored):
        module.accumulate(batch)
        module.step()
    assert torch.equal(restored.lambdas, loss.lambdas) and torch.equal(restored.rhos, loss.rhos)
    # state_dict survives a torch.save / torch.load(weights_only=True) checkpoint
    import io

    buffer = io.BytesIO()
    torch.save(loss.state_dict(), buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=True)["rhos"], loss.rhos)


def test_step_without_accumulate_is_an_error() -> None:
    loss = build_loss("cals", num_classes=3)
    with pytest.raises(RuntimeError, match="accumulate"):
        loss.step()


def test_wrong_number_of_classes_is_an_error() -> None:
    loss = build_loss("cals", num_classes=4)
    logits, target = random_batch(SHAPES["2d"])
    with pytest.raises(ValueError, match="4 classes"):
        loss(logits, target)
    with pytest.raises(ValueError, match="4 classes"):
        loss.accumulate(logits)


def test_invalid_parameters() -> None:
    with pytest.raises(ConfigError, match="loss 'cals': parameter 'penalty' must be one of 'phr', 'p2', 'p3'"):
        build_loss("cals", num_classes=3, penalty="p4")
    with pytest.raises(ConfigError, match="parameter 'margin'"):
        build_loss("cals", num_classes=3, margin=0.0)  # normalised h = (d - m)/m needs m > 0
    build_loss("cals", num_classes=3, margin=0.0, normalize=False)
    with pytest.raises(ConfigError, match="parameter 'rho_max'"):
        build_loss("cals", num_classes=3, rho_init=2.0, rho_max=1.0)
    with pytest.raises(ConfigError, match="parameter 'num_classes'"):
        build_loss("cals", num_classes=True)
    with pytest.raises(ConfigError, match="missing required parameter 'num_classes'"):
        build_loss("cals")


def test_heuristic_variant_updates() -> None:
    # C = 2, m = 2: violation v = mean_i max(h, 0). Epoch 1 logits (4,0),(0,1): h = (-1, 1), (-0.5, -1) -> v = (0, 0.5)
    # Epoch 2 logits (6,0),(0,1): h = (-1, 2), (-0.5, -1) -> v = (0, 1): class 1 grew -> lambda_1 * 1.2, class 0 /1.2
    loss = build_loss("cals_heuristic", num_classes=2, margin=2.0, lambda_init=1.0, gamma=1.2)
    assert torch.equal(loss.lambdas, torch.ones(2))
    loss.accumulate(_two_voxels((4.0, 0.0)))
    loss.step()
    assert torch.equal(loss.lambdas, torch.ones(2))  # no previous violation yet
    loss.accumulate(_two_voxels((6.0, 0.0)))
    loss.step()
    torch.testing.assert_close(loss.lambdas, torch.tensor([1 / 1.2, 1.2]))
    assert {"lambdas", "rhos", "previous_violation", "previous_constraint", "epoch"} == set(loss.state_dict())


# -- two processes (gloo) -----------------------------------------------------------------------


def _ddp_worker(rank: int, init_file: str, out_dir: str, params: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        loss = build_loss("cals", num_classes=3, **params)
        for batches in _validation_epochs(3, 3, seed=37):
            mine = batches[:2] if rank == 0 else batches[2:]  # unequal halves: 2 batches and 1
            for batch in mine:
                loss.accumulate(batch)
            loss.step()
        torch.save({k: v.clone() for k, v in loss.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_update_equals_single_process(tmp_path) -> None:
    params = dict(margin=2.0, rho_step=1, tau=0.5)
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path), params), nprocs=2, join=True)
    single = build_loss("cals", num_classes=3, **params)
    for batches in _validation_epochs(3, 3, seed=37):
        for batch in batches:
            single.accumulate(batch)
        single.step()
    assert (single.rhos > 1).any(), "the sequence should exercise the rho update"
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(state["lambdas"], single.lambdas, rtol=1e-6, atol=0)
        torch.testing.assert_close(state["rhos"], single.rhos, rtol=1e-6, atol=0)
        torch.testing.assert_close(state["previous_constraint"], single.previous_constraint, rtol=1e-12, atol=1e-15)
