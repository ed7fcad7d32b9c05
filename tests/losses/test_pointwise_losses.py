"""ce, dice, ce_dice, focal, focal_adaptive, ls, ecp, logit_l1: hand values, float64 references, twins."""

from __future__ import annotations

import math

import monai.losses
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segcalib.losses import build_loss
from tests.losses import _reference as ref
from tests.losses._helpers import SHAPES, random_batch

LN3 = math.log(3.0)


def _tiny():
    """One sample, 2 classes, 1x2 image. Voxel a: z = (0, ln 3) -> p = (1/4, 3/4), y = 1.
    Voxel b: z = (0, 0) -> p = (1/2, 1/2), y = 0."""
    logits = torch.tensor([[[[0.0, 0.0]], [[LN3, 0.0]]]], dtype=torch.float64)
    target = torch.tensor([[[1, 0]]])
    return logits, target


def test_ce_by_hand() -> None:
    logits, target = _tiny()
    # a: -ln(3/4) = ln(4/3); b: ln 2; mean = (ln(4/3) + ln 2)/2 = ln(8/3)/2
    assert build_loss("ce")(logits, target).item() == pytest.approx(math.log(8 / 3) / 2, rel=1e-12)


def test_dice_by_hand() -> None:
    logits, target = _tiny()
    eps = 1e-5
    # class 0: sum p g = p_b0 = 1/2; sum p = 1/4 + 1/2 = 3/4; sum g = 1 -> 1 - (1 + eps)/(7/4 + eps)
    d0 = 1 - (1 + eps) / (7 / 4 + eps)
    # class 1: sum p g = p_a1 = 3/4; sum p = 3/4 + 1/2 = 5/4; sum g = 1 -> 1 - (3/2 + eps)/(9/4 + eps)
    d1 = 1 - (1.5 + eps) / (9 / 4 + eps)
    assert build_loss("dice")(logits, target).item() == pytest.approx((d0 + d1) / 2, rel=1e-12)
    assert build_loss("dice", include_background=False)(logits, target).item() == pytest.approx(d1, rel=1e-12)
    assert build_loss("ce_dice")(logits, target).item() == pytest.approx(math.log(8 / 3) / 2 + (d0 + d1) / 2, rel=1e-12)


def test_focal_by_hand() -> None:
    logits, target = _tiny()
    # a: p_y = 3/4 -> (1/4)^3 ln(4/3); b: p_y = 1/2 -> (1/2)^3 ln 2
    expected = (math.log(4 / 3) / 64 + math.log(2) / 8) / 2
    assert build_loss("focal")(logits, target).item() == pytest.approx(expected, rel=1e-12)
    # gamma = 0 is plain cross-entropy
    assert build_loss("focal", gamma=0.0)(logits, target).item() == pytest.approx(math.log(8 / 3) / 2, rel=1e-12)


def test_focal_adaptive_by_hand() -> None:
    # a: z = (0, ln 9), y = 0 -> p_y = 1/10 < 0.2 -> gamma 5: (9/10)^5 ln 10
    # b: z = (0, 0), y = 0 -> p_y = 1/2 -> gamma 3: (1/2)^3 ln 2
    logits = torch.tensor([[[[0.0, 0.0]], [[math.log(9.0), 0.0]]]], dtype=torch.float64)
    target = torch.tensor([[[0, 0]]])
    expected = (0.9**5 * math.log(10) + math.log(2) / 8) / 2
    assert build_loss("focal_adaptive")(logits, target).item() == pytest.approx(expected, rel=1e-12)


def test_label_smoothing_by_hand() -> None:
    logits, target = _tiny()
    # eps = 0.1, C = 2 -> targets (0.05, 0.95) at a, (0.95, 0.05) at b
    a = -(0.05 * math.log(1 / 4) + 0.95 * math.log(3 / 4))
    b = -(0.95 + 0.05) * math.log(1 / 2)
    loss = build_loss("ls", epsilon=0.1)
    assert loss(logits, target).item() == pytest.approx((a + b) / 2, rel=1e-12)
    # components: ce = ln(8/3)/2, penalty = mean_i (1/C) sum_k -log p_ik = ((ln 4 + ln(4/3))/2 + ln 2)/2
    assert loss.last_components["ce"].item() == pytest.approx(math.log(8 / 3) / 2, rel=1e-12)
    assert loss.last_components["penalty"].item() == pytest.approx(((math.log(4) + math.log(4 / 3)) / 2 + math.log(2)) / 2)


def test_ecp_by_hand() -> None:
    # b only: p = (1/2, 1/2), y = 0 -> CE = ln 2, entropy / C = ln 2 / 2 -> ln 2 - 0.1 ln 2 / 2
    logits = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    loss = build_loss("ecp", alpha=0.1)
    assert loss(logits, target).item() == pytest.approx(math.log(2) * 0.95, rel=1e-12)
    assert loss.last_components["penalty"].item() == pytest.approx(-math.log(2) / 2, rel=1e-12)


def test_ecp_clamps_probabilities() -> None:
    # p = (1, ~e^-100): clamped to (1 - 1e-10, 1e-10); entropy/C = -(1e-10 ln 1e-10 + (1-1e-10) ln(1-1e-10))/2
    logits = torch.tensor([[[[100.0]], [[0.0]]]], dtype=torch.float64)
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    loss = build_loss("ecp", alpha=1.0)
    loss(logits, target)
    q = 1e-10
    expected = (q * math.log(q) + (1 - q) * math.log(1 - q)) / 2
    assert loss.last_components["penalty"].item() == pytest.approx(expected, rel=1e-9)


def test_logit_l1_by_hand() -> None:
    # z = (1, -3), y = 0: CE = ln(1 + e^-4); mean |z| = 2 -> CE + 0.01 * 2
    logits = torch.tensor([[[[1.0]], [[-3.0]]]], dtype=torch.float64)
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    assert build_loss("logit_l1")(logits, target).item() == pytest.approx(math.log1p(math.exp(-4)) + 0.02, rel=1e-12)


CASES = {
    "ce": ({}, lambda z, y, ii: ref.ce(z, y, ii)),
    "dice": ({}, lambda z, y, ii: ref.dice(z, y, True, ii)),
    "dice_nobg": ({"include_background": False}, lambda z, y, ii: ref.dice(z, y, False, ii)),
    "ce_dice": ({}, lambda z, y, ii: ref.ce(z, y, ii) + ref.dice(z, y, True, ii)),
    "focal": ({"gamma": 2.5}, lambda z, y, ii: ref.focal(z, y, 2.5, False, ii)),
    "focal_adaptive": ({}, lambda z, y, ii: ref.focal(z, y, 3.0, True, ii)),
    "ls": ({"epsilon": 0.2}, lambda z, y, ii: ref.label_smoothing(z, y, 0.2, ii)),
    "ecp": ({"alpha": 0.3}, lambda z, y, ii: ref.ecp(z, y, 0.3, ii)),
    "logit_l1": ({"alpha": 0.05}, lambda z, y, ii: ref.logit_l1(z, y, 0.05, ii)),
}


@pytest.mark.parametrize("dims", sorted(SHAPES))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("with_ignore", [False, True])
def test_matches_float64_reference(case: str, dims: str, with_ignore: bool) -> None:
    params, reference = CASES[case]
    logits, target = random_batch(SHAPES[dims], dtype=torch.float64, seed=3)
    if with_ignore:
        target[torch.rand(target.shape, generator=torch.Generator().manual_seed(1)) < 0.3] = -100
    loss = build_loss(case.replace("_nobg", ""), **params)
    expected = reference(logits.numpy(), target.numpy(), -100)
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    # float32 agrees to float32 precision
    assert loss(logits.float(), target).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradcheck(case: str) -> None:
    params, _ = CASES[case]
    logits, target = random_batch((2, 3, 3, 2), dtype=torch.float64, scale=1.5, seed=5)
    target[0, 0, 0] = -100
    loss = build_loss(case.replace("_nobg", ""), **params)
    assert torch.autograd.gradcheck(lambda z: loss(z, target), (logits.requires_grad_(),))


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("dims", sorted(SHAPES))
def test_dice_matches_monai(include_background: bool, dims: str) -> None:
    logits, target = random_batch(SHAPES[dims], dtype=torch.float64, seed=7)
    twin = monai.losses.DiceLoss(
        softmax=True, to_onehot_y=True, smooth_nr=1e-5, smooth_dr=1e-5, batch=False,
        include_background=include_background,
    )  # fmt: skip
    ours = build_loss("dice", include_background=include_background)(logits, target)
    torch.testing.assert_close(ours, twin(logits, target.unsqueeze(1)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dims", sorted(SHAPES))
def test_ce_dice_matches_monai(dims: str) -> None:
    logits, target = random_batch(SHAPES[dims], dtype=torch.float64, seed=8)
    twin = monai.losses.DiceCELoss(softmax=True, to_onehot_y=True, smooth_nr=1e-5, smooth_dr=1e-5, batch=False)
    torch.testing.assert_close(build_loss("ce_dice")(logits, target), twin(logits, target.unsqueeze(1)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dims", sorted(SHAPES))
def test_focal_matches_monai(dims: str) -> None:
    """MONAI's terms are -(1-p_k)^g log p_k * onehot_k per class; reduction="mean" averages them over
    voxels x classes, so C times it is our mean over voxels (MONAI computes in float32)."""
    logits, target = random_batch(SHAPES[dims], dtype=torch.float64, seed=9)
    twin = monai.losses.FocalLoss(use_softmax=True, to_onehot_y=True, gamma=3.0, reduction="mean")
    expected = twin(logits, target.unsqueeze(1)).double() * logits.shape[1]
    torch.testing.assert_close(build_loss("focal")(logits, target), expected, rtol=1e-6, atol=1e-8)


def test_label_smoothing_matches_torch() -> None:
    logits, target = random_batch(SHAPES["3d"], dtype=torch.float64, seed=10)
    target[0, 0] = -100
    expected = F.cross_entropy(logits, target, label_smoothing=0.1, ignore_index=-100)
    torch.testing.assert_close(build_loss("ls")(logits, target), expected, rtol=1e-12, atol=1e-12)


def test_ce_one_valid_voxel() -> None:
    """The reference code's nonzero().squeeze() idiom breaks with one valid voxel; masking does not."""
    logits, target = random_batch((1, 3, 2, 2), dtype=torch.float64)
    target.fill_(-100)
    target[0, 1, 1] = 2
    expected = -torch.log_softmax(logits[0, :, 1, 1], 0)[2]
    as_plain_ce = {"ce": {}, "ls": {"epsilon": 0.0}, "focal": {"gamma": 0.0}, "ecp": {"alpha": 0.0}, "logit_l1": {"alpha": 0.0}}
    for name, params in as_plain_ce.items():
        torch.testing.assert_close(build_loss(name, **params)(logits, target), expected, rtol=1e-12, atol=1e-12)


def test_focal_small_gamma_with_ignored_voxels_has_finite_gradient() -> None:
    logits, target = random_batch((1, 3, 4, 4))
    target[0, 0] = -100
    logits.requires_grad_(True)
    build_loss("focal", gamma=0.5)(logits, target).backward()
    assert torch.isfinite(logits.grad).all()


def test_dice_reference_agrees_on_numpy_inputs() -> None:
    """Guard for the reference itself: a perfect, confident prediction has Dice loss ~ 0."""
    target = np.array([[[0, 1], [2, 1]]])
    logits = np.moveaxis(np.eye(3)[target] * 50.0, -1, 1)
    assert ref.dice(logits, target) == pytest.approx(0.0, abs=1e-6)
