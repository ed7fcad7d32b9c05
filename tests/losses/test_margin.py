"""mbls, mbls_dice and the fused CE + distance-penalty function they share with CALS."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from segcalib.losses import build_loss
from segcalib.losses._inputs import LossInputs
from segcalib.losses._margin_ce import cross_entropy_with_penalty
from segcalib.losses._penalties import PENALTIES, Margin
from tests.losses import _reference as ref
from tests.losses._helpers import SHAPES, random_batch


def test_mbls_by_hand() -> None:
    # z = (10, 2, -5), y = 0, m = 4: d = (0, 8, 15); relu(d - 4) = (0, 4, 11); mean over C = 15/3 = 5
    # CE = log(1 + e^-8 + e^-15); loss = CE + 0.1 * 5
    logits = torch.tensor([10.0, 2.0, -5.0], dtype=torch.float64).reshape(1, 3, 1, 1)
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    loss = build_loss("mbls", margin=4.0, alpha=0.1)
    ce = math.log(1 + math.exp(-8) + math.exp(-15))
    assert loss(logits, target).item() == pytest.approx(ce + 0.5, rel=1e-12)
    assert loss.last_components["penalty"].item() == pytest.approx(5.0, rel=1e-12)
    assert loss.last_components["ce"].item() == pytest.approx(ce, rel=1e-12)


def test_mbls_margin_zero_is_the_equality_penalty() -> None:
    # m = 0: mean_k d_k = (0 + 8 + 15)/3
    logits = torch.tensor([10.0, 2.0, -5.0], dtype=torch.float64).reshape(1, 3, 1, 1)
    loss = build_loss("mbls", margin=0.0, alpha=1.0)
    loss(logits, torch.zeros(1, 1, 1, dtype=torch.long))
    assert loss.last_components["penalty"].item() == pytest.approx(23 / 3, rel=1e-12)


def test_mbls_dice_by_hand() -> None:
    # Two voxels, C = 2. a: z = (0, ln 3), y = 1; b: z = (0, 0), y = 0. m = 1:
    # d_a = (ln 3, 0) -> relu(ln 3 - 1) = 0.0986..; d_b = (0, 0). Penalty = (ln 3 - 1)/(2 voxels * 2 classes)
    # Dice without background = class 1 only = 1 - (3/2 + eps)/(9/4 + eps) (see test_dice_by_hand)
    ln3, eps = math.log(3.0), 1e-5
    logits = torch.tensor([[[[0.0, 0.0]], [[ln3, 0.0]]]], dtype=torch.float64)
    target = torch.tensor([[[1, 0]]])
    loss = build_loss("mbls_dice", margin=1.0, alpha=0.5)
    ce = math.log(8 / 3) / 2
    dice = 1 - (1.5 + eps) / (9 / 4 + eps)
    penalty = (ln3 - 1) / 4
    assert loss(logits, target).item() == pytest.approx(ce + dice + 0.5 * penalty, rel=1e-12)
    assert loss.last_components["dice"].item() == pytest.approx(dice, rel=1e-12)
    assert loss.last_components["penalty"].item() == pytest.approx(penalty, rel=1e-12)


@pytest.mark.parametrize("dims", sorted(SHAPES))
@pytest.mark.parametrize("with_ignore", [False, True])
def test_mbls_matches_float64_reference(dims: str, with_ignore: bool) -> None:
    logits, target = random_batch(SHAPES[dims], dtype=torch.float64, seed=11)
    if with_ignore:
        target[torch.rand(target.shape, generator=torch.Generator().manual_seed(2)) < 0.3] = -100
    z, y = logits.numpy(), target.numpy()
    loss = build_loss("mbls", margin=3.0, alpha=0.2)
    assert loss(logits, target).item() == pytest.approx(ref.mbls(z, y, 3.0, 0.2), rel=1e-10)
    assert loss.last_components["penalty"].item() > 0
    assert loss(logits.float(), target).item() == pytest.approx(ref.mbls(z, y, 3.0, 0.2), rel=1e-5)
    dice = build_loss("mbls_dice", margin=3.0, alpha=0.2)
    expected = ref.mbls(z, y, 3.0, 0.2) + ref.dice(z, y, include_background=False)
    assert dice(logits, target).item() == pytest.approx(expected, rel=1e-10)


def _naive(logits, target, penalty, margin, scale, lam, rho):
    """The same loss written with autograd ops (amax shares its gradient among ties)."""
    ce = F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
    valid = (target != -100).to(logits.dtype)
    count = valid.sum().clamp_min(1)
    h = (logits.amax(1, keepdim=True) - logits - margin) * scale
    shape = (1, -1) + (1,) * (logits.dim() - 2)
    lam = None if lam is None else lam.reshape(shape)
    rho = None if rho is None else rho.reshape(shape)
    values = penalty.value(h.clone(), lam, rho)
    return ce / count, (values.sum(1) * valid).sum() / (count * logits.shape[1])


PENALTY_CASES = [("margin", Margin(), 1.0)] + [(name, p, 0.5) for name, p in PENALTIES.items()]


@pytest.mark.parametrize("name,penalty,scale", PENALTY_CASES, ids=[c[0] for c in PENALTY_CASES])
def test_fused_function_gradcheck(name, penalty, scale) -> None:
    logits, target = random_batch((2, 3, 2, 3), dtype=torch.float64, scale=2.0, seed=12)
    target[1, 0, 0] = -100
    lam = torch.tensor([0.3, 1.5, 0.7], dtype=torch.float64)
    rho = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    args = (lam, rho) if name != "margin" else (None, None)

    def f(z):
        ce, pen = cross_entropy_with_penalty(LossInputs(z, target, -100), penalty, 1.0, scale, *args)
        return ce + 0.7 * pen, pen

    assert torch.autograd.gradcheck(f, (logits.requires_grad_(),))


@pytest.mark.parametrize("name,penalty,scale", PENALTY_CASES, ids=[c[0] for c in PENALTY_CASES])
def test_fused_function_matches_autograd_with_ties(name, penalty, scale) -> None:
    """Exact ties at the maximum (common with bf16 logits): the gradient of max is shared evenly."""
    logits, target = random_batch((2, 4, 5, 6), dtype=torch.float64, seed=13)
    logits = (logits * 2).round() / 2  # many ties
    logits[:, 1] = logits[:, 2]
    target[0, 0] = -100
    lam = torch.tensor([0.3, 1.5, 0.7, 0.1], dtype=torch.float64)
    rho = torch.tensor([1.0, 2.0, 4.0, 1.5], dtype=torch.float64)
    args = (lam, rho) if name != "margin" else (None, None)
    grads = []
    for fn in (
        lambda z: cross_entropy_with_penalty(LossInputs(z, target, -100), penalty, 1.0, scale, *args),
        lambda z: _naive(z, target, penalty, 1.0, scale, *args),
    ):
        z = logits.clone().requires_grad_(True)
        ce, pen = fn(z)
        (ce + 0.7 * pen).backward()
        grads.append((ce.detach(), pen.detach(), z.grad))
    for ours, naive in zip(grads[0], grads[1]):
        torch.testing.assert_close(ours, naive, rtol=1e-12, atol=1e-12)


def test_fused_function_survives_retain_graph() -> None:
    logits, target = random_batch((1, 3, 4, 4), seed=14)
    logits.requires_grad_(True)
    loss = build_loss("mbls", margin=1.0)(logits, target)
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    loss.backward()
    torch.testing.assert_close(logits.grad, 2 * first)


@pytest.mark.parametrize("name", ["mbls", "mbls_dice"])
def test_invalid_parameters(name: str) -> None:
    from segcalib.errors import ConfigError

    with pytest.raises(ConfigError, match=f"loss '{name}': parameter 'margin'"):
        build_loss(name, margin=-1.0)
    with pytest.raises(ConfigError, match="parameter 'alpha'"):
        build_loss(name, alpha="0.1")
