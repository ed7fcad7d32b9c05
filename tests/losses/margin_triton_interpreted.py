"""The fused MbLS/CALS Triton kernel against the torch path, through Triton's CPU interpreter.

Collected only by name from :func:`tests.losses.test_margin_triton.test_kernel_interpreted_on_cpu`,
which runs this file in a fresh process with ``TRITON_INTERPRET=1`` (Triton reads it when it is
first imported). Run by hand:
``TRITON_INTERPRET=1 python -m pytest tests/losses/margin_triton_interpreted.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

from segcalib.losses import _margin_ce
from tests.losses._helpers import make_loss, random_batch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
pytest.importorskip("triton")

LAMBDAS = [0.3, 1.5, 0.7, 0.1, 2.0]
RHOS = [1.0, 2.0, 4.0, 1.5, 3.0]
CASES = [  # (loss, parameters): every penalty, normalised (scale 1/m) and not
    ("mbls", {"margin": 2.0, "alpha": 0.3}),
    ("mbls_dice", {"margin": 1.0, "alpha": 0.5}),
    ("cals", {"margin": 2.0, "penalty": "phr"}),
    ("cals", {"margin": 1.5, "penalty": "p2", "normalize": False}),
    ("cals", {"margin": 3.0, "penalty": "p3"}),
]


def _force(monkeypatch, backend: str) -> list[str]:
    """Make :func:`_margin_ce.fused_backend` answer ``backend`` on CPU; returns the answers given."""
    answers: list[str] = []

    def pick(logits, penalty):
        answers.append(backend)
        return backend

    monkeypatch.setattr(_margin_ce, "fused_backend", pick)
    return answers


def _build(name: str, params: dict, classes: int):
    loss = make_loss(name, classes, **params)
    if name.startswith("cals"):  # class-wise multipliers away from their start value
        loss.lambdas.copy_(torch.tensor(LAMBDAS[:classes]))
        loss.rhos.copy_(torch.tensor(RHOS[:classes]))
    return loss


def _run(monkeypatch, backend, name, params, logits, target, grad_scale=1.0):
    answers = _force(monkeypatch, backend)
    loss_fn = _build(name, params, logits.shape[1])
    z = logits.clone().requires_grad_(True)
    loss = loss_fn(z, target)
    (loss * grad_scale).backward()
    assert answers and set(answers) == {backend}
    return loss.detach(), loss_fn.last_components, z.grad


def _compare(monkeypatch, name, params, logits, target, grad_tol=1e-6, grad_scale=1.0):
    fused = _run(monkeypatch, "triton", name, params, logits, target, grad_scale)
    torch_path = _run(monkeypatch, "torch", name, params, logits, target, grad_scale)
    torch.testing.assert_close(fused[0], torch_path[0], rtol=1e-6, atol=1e-7)
    for key, value in torch_path[1].items():
        torch.testing.assert_close(fused[1][key], value, rtol=1e-6, atol=1e-7, msg=key)
    assert fused[2].dtype == logits.dtype
    # float32 cancellation in softmax - onehot: entries are compared to 1e-6 of the largest one
    reference = torch_path[2].float()
    atol = grad_tol * reference.abs().max().item()
    torch.testing.assert_close(fused[2].float(), reference, rtol=grad_tol, atol=atol)
    return fused


@pytest.mark.parametrize("name, params", CASES, ids=[f"{n}-{p.get('penalty', 'margin')}" for n, p in CASES])
@pytest.mark.parametrize("shape", [(2, 3, 9, 7), (2, 5, 4, 5, 3)], ids=["2d", "3d-5classes"])
def test_kernel_equals_torch_path_float32(monkeypatch, name, params, shape) -> None:
    logits, target = random_batch(shape, seed=sum(shape))
    target[0, :2] = -100  # ignored voxels
    _compare(monkeypatch, name, params, logits, target)


@pytest.mark.parametrize("name, params", [CASES[0], CASES[2]], ids=["mbls", "cals"])
def test_kernel_ties_ignore_index_and_scaled_gradient(monkeypatch, name, params) -> None:
    logits, target = random_batch((2, 4, 6, 5, 3), seed=3)
    logits = (logits * 2).round() / 2  # exact ties at the maximum: the max's gradient is shared
    logits[:, 1] = logits[:, 2]
    target[1, 0] = 2  # ignore_index inside [0, C)
    params = {**params, "ignore_index": 2}
    _compare(monkeypatch, name, params, logits, target, grad_scale=1024.0)


@pytest.mark.parametrize("dtype, bits", [(torch.bfloat16, 8), (torch.float16, 11)], ids=["bf16", "fp16"])
def test_kernel_half_logits_read_directly(monkeypatch, dtype, bits) -> None:
    # the kernel reads half precision, computes in float32 and rounds the gradient once on store:
    # values equal the torch path's on the same numbers in float32; the gradient is that float32
    # gradient rounded (exactly, but for entries within float32 noise of a rounding boundary: one ulp)
    logits, target = random_batch((2, 4, 8, 6, 3), seed=4)
    logits = logits.to(dtype)
    for name, params in (CASES[0], CASES[2]):
        loss, parts, grad = _run(monkeypatch, "triton", name, params, logits, target)
        ref_loss, ref_parts, ref_grad = _run(monkeypatch, "torch", name, params, logits.float(), target)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(parts["penalty"], ref_parts["penalty"], rtol=1e-6, atol=1e-7)
        assert grad.dtype == dtype
        rounded = ref_grad.to(dtype)
        exact = (grad == rounded).float().mean().item()
        assert exact >= 0.995, exact
        ulp = (rounded.float().abs() * 2.0 ** (1 - bits)).clamp_min(1e-30)
        assert ((grad.float() - rounded.float()).abs() <= ulp).all()


def test_kernel_channels_last_and_no_grad(monkeypatch) -> None:
    logits, target = random_batch((2, 3, 4, 5, 6), seed=6)
    fused = _compare(monkeypatch, "cals", CASES[2][1], logits.to(memory_format=torch.channels_last_3d), target)
    _force(monkeypatch, "triton")
    with torch.no_grad():  # validation loss: no gradient written
        value = _build("cals", CASES[2][1], 3)(logits, target)
    torch.testing.assert_close(value, fused[0], rtol=1e-6, atol=1e-7)


def test_kernel_all_ignored_gives_zero_and_zero_gradient(monkeypatch) -> None:
    logits, target = random_batch((1, 3, 4, 4), seed=7)
    target.fill_(-100)
    loss, _, grad = _run(monkeypatch, "triton", "mbls", {"margin": 1.0}, logits, target)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_kernel_survives_retain_graph(monkeypatch) -> None:
    _force(monkeypatch, "triton")
    logits, target = random_batch((1, 3, 4, 4), seed=8)
    logits.requires_grad_(True)
    loss = make_loss("mbls", margin=1.0)(logits, target)
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    loss.backward()
    torch.testing.assert_close(logits.grad, 2 * first)
