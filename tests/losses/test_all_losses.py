"""The same checks for every registered loss: shapes, dtypes, gradients, components, ignore, devices."""

from __future__ import annotations

import math
import re

import pytest
import torch

from segcalib.losses import AdaptiveLoss, CalibrationLoss, list_losses
from tests.losses._helpers import NUM_CLASSES, SHAPES, make_loss, random_batch

ALL = list_losses()
SPEC_NAMES = {"ce", "dice", "ce_dice", "focal", "focal_adaptive", "ls", "ecp", "logit_l1", "mbls", "mbls_dice", "svls", "nacl", "cals"}
# Small margins so that the margin penalties are active on random logits (the defaults, m = 10, are not).
ACTIVE = {"mbls": {"margin": 2.0}, "mbls_dice": {"margin": 2.0}, "cals": {"margin": 2.0}, "cals_heuristic": {"margin": 2.0}}


def test_every_spec_loss_is_registered() -> None:
    assert SPEC_NAMES <= set(ALL)


def _loss(name: str, device: str = "cpu"):
    return make_loss(name, **ACTIVE.get(name, {})).to(device)


def _check_forward_backward(name: str, shape, device: str = "cpu") -> None:
    loss_fn = _loss(name, device)
    assert isinstance(loss_fn, CalibrationLoss)
    logits, target = random_batch(shape, device=device)
    logits.requires_grad_(True)

    value = loss_fn(logits, target)
    assert value.dim() == 0 and value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0

    parts = loss_fn.last_components
    assert parts, "last_components is empty"
    for key, part in parts.items():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", key)
        assert part.dim() == 0 and not part.requires_grad and torch.isfinite(part)

    # (B, 1, *S) targets and integral float targets give the same value
    assert torch.equal(loss_fn(logits, target.unsqueeze(1)), value)
    assert torch.equal(loss_fn(logits, target.float()), value)


@pytest.mark.parametrize("dims", sorted(SHAPES))
@pytest.mark.parametrize("name", ALL)
def test_forward_backward_components(name: str, dims: str) -> None:
    _check_forward_backward(name, SHAPES[dims])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ALL)
def test_cuda_matches_cpu(name: str) -> None:
    _check_forward_backward(name, SHAPES["3d"], device="cuda")
    logits, target = random_batch(SHAPES["3d"])
    cpu = _loss(name)(logits, target)
    with torch.backends.cudnn.flags(allow_tf32=False):  # the svls/nacl filters are convolutions
        gpu = _loss(name, "cuda")(logits.cuda(), target.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_deterministic_and_state_free(name: str) -> None:
    loss_fn = _loss(name)
    logits, target = random_batch(SHAPES["3d"])
    before = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    first = loss_fn(logits, target)
    second = loss_fn(logits, target)
    assert torch.equal(first, second)
    after = loss_fn.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ALL)
def test_all_ignored_batch_is_zero_with_zero_gradient(name: str) -> None:
    loss_fn = _loss(name)
    logits, target = random_batch(SHAPES["2d"])
    logits.requires_grad_(True)
    value = loss_fn(logits, torch.full_like(target, -100))
    value.backward()
    assert value.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize("name", ALL)
def test_ignored_voxels_do_not_change_the_loss(name: str) -> None:
    """Whatever the logits at ignored voxels are, loss and the gradient elsewhere stay the same."""
    loss_fn = _loss(name)
    logits, target = random_batch(SHAPES["3d"])
    target[:, 0] = 7  # ignored with ignore_index=7 (not a class)
    loss_fn.ignore_index = 7
    other = logits.clone()
    other[:, :, 0] = torch.randn_like(other[:, :, 0]) * 50
    grads = []
    values = []
    for z in (logits, other):
        z = z.clone().requires_grad_(True)
        values.append(loss_fn(z, target))
        values[-1].backward()
        grads.append(z.grad)
        assert torch.count_nonzero(z.grad[:, :, 0]) == 0
    torch.testing.assert_close(values[0], values[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ALL)
def test_half_precision_is_computed_in_float32(name: str, dtype: torch.dtype) -> None:
    loss_fn = _loss(name)
    logits, target = random_batch(SHAPES["2d"], dtype=dtype)
    half = logits.clone().requires_grad_(True)
    value = loss_fn(half, target)
    value.backward()
    assert value.dtype == torch.float32 and half.grad.dtype == dtype
    torch.testing.assert_close(value, loss_fn(logits.float(), target), rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_autocast_bf16(name: str) -> None:
    loss_fn = _loss(name)
    logits, target = random_batch(SHAPES["2d"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss_fn(logits, target)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss_fn(logits, target))


@pytest.mark.parametrize("name", ALL)
def test_wrong_target_shape_is_an_error(name: str) -> None:
    logits, target = random_batch(SHAPES["2d"])
    with pytest.raises(ValueError, match="target shape"):
        _loss(name)(logits, target[:, :-1])


@pytest.mark.parametrize("name", [n for n in ALL if issubclass(type(make_loss(n)), AdaptiveLoss)])
def test_adaptive_state_is_in_buffers(name: str) -> None:
    """Multipliers per class (CALS: ``(C,)``; CRaC: ``(regions, C)``) in buffers; one outer update
    from validation batches (logits and labels) moves them and the epoch counter, and the logged
    state names one finite value per multiplier."""
    loss_fn = make_loss(name)
    state = loss_fn.state_dict()
    assert state["lambdas"].shape[-1] == NUM_CLASSES and state["rhos"].shape == state["lambdas"].shape
    assert {"lambdas", "rhos", "epoch"} <= set(dict(loss_fn.named_buffers()))
    before = loss_fn.lambdas.clone()
    for seed in (1, 2):  # two epochs: the heuristic variant needs a previous epoch to compare with
        logits, target = random_batch(SHAPES["3d"], scale=5.0 * seed, seed=seed)
        loss_fn.accumulate(logits, target)
        loss_fn.step()
    assert int(loss_fn.epoch) == 2 and not torch.equal(loss_fn.lambdas, before)
    logged = loss_fn.logged_state()
    assert len(logged) == 2 * loss_fn.lambdas.numel() and all(math.isfinite(v) for v in logged.values())
