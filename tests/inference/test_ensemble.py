"""Streaming probability ensemble: identities of the entropy decomposition, parity with an
all-at-once float64 reference, weights, and a case worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segcalib.inference.ensemble import ProbabilityEnsemble


def _members(n: int, shape=(2, 3, 5, 4, 3), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.softmax(torch.randn(shape, generator=g) * 3, dim=1).float() for _ in range(n)]


def _reference(members: list[torch.Tensor], weights: list[float]) -> dict[str, np.ndarray]:
    """All members at once in float64 numpy (independent of the streaming code)."""
    p = np.stack([m.double().numpy() for m in members])  # (M, B, C, *S)
    w = np.asarray(weights, dtype=np.float64)
    w = (w / w.sum()).reshape((-1,) + (1,) * (p.ndim - 1))
    mean = (w * p).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
        mlogm = np.where(mean > 0, mean * np.log(mean), 0.0)
    entropy = -mlogm.sum(1)
    expected = -(w[:, :, 0] * plogp.sum(2)).sum(0)
    variance = (w * (p - mean) ** 2).sum(0)
    return {"mean": mean, "entropy": entropy, "expected": expected, "mi": entropy - expected, "variance": variance}


def test_a_member_with_itself_is_the_member() -> None:
    (p,) = _members(1)
    ens = ProbabilityEnsemble(variance=True)
    ens.add(p)
    ens.add(p)
    out = ens.result()
    torch.testing.assert_close(out.mean, p.double(), atol=1e-7, rtol=0)
    reference_entropy = -(p.double() * p.double().log()).sum(1)
    torch.testing.assert_close(out.entropy, reference_entropy, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.expected_entropy, reference_entropy, atol=1e-6, rtol=0)
    assert out.mutual_info.abs().max().item() < 1e-6
    assert out.variance.abs().max().item() < 1e-12
    assert out.members == 2


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0, 1.0, 1.0], [0.5, 2.0, 1.0, 3.0, 0.25]])
def test_streamed_equals_all_at_once_float64_reference(weights: list[float]) -> None:
    members = _members(len(weights))
    ens = ProbabilityEnsemble(variance=True)
    for m, w in zip(members, weights):
        ens.add(m, weight=w)
    out = ens.result()
    ref = _reference(members, weights)
    np.testing.assert_allclose(out.mean.numpy(), ref["mean"], atol=1e-12)
    np.testing.assert_allclose(out.entropy.numpy(), ref["entropy"], atol=1e-12)
    np.testing.assert_allclose(out.expected_entropy.numpy(), ref["expected"], atol=1e-12)
    np.testing.assert_allclose(out.mutual_info.numpy(), np.maximum(ref["mi"], 0), atol=1e-12)
    np.testing.assert_allclose(out.variance.numpy(), ref["variance"], atol=1e-12)
    # the decomposition: H[E p] = E[H[p]] + MI, MI >= 0, and members disagree here (MI > 0 somewhere)
    assert (out.entropy - out.expected_entropy - out.mutual_info).abs().max().item() < 1e-6
    assert out.mutual_info.min().item() >= 0 and out.mutual_info.max().item() > 0.1


def test_float32_sums_stay_within_1e6() -> None:
    members = _members(8, shape=(1, 4, 16, 16), seed=3)
    ens = ProbabilityEnsemble(dtype=torch.float32)
    for m in members:
        ens.add(m)
    out = ens.result()
    ref = _reference(members, [1.0] * 8)
    assert out.mean.dtype == torch.float32
    np.testing.assert_allclose(out.entropy.numpy(), ref["entropy"], atol=2e-6)
    np.testing.assert_allclose(out.expected_entropy.numpy(), ref["expected"], atol=2e-6)
    assert (out.entropy - out.expected_entropy - out.mutual_info).abs().max().item() < 1e-6
    assert out.mutual_info.min().item() >= 0


def test_two_confident_members_that_disagree_worked_by_hand() -> None:
    # member 1 says class 0 for sure, member 2 class 1 for sure: each has entropy 0, the mean
    # (0.5, 0.5) has entropy log 2, so all of it is epistemic: MI = log 2; variance 0.25 each class.
    a = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    ens = ProbabilityEnsemble(variance=True)
    ens.add(a)
    ens.add(a.flip(1))
    out = ens.result()
    assert out.entropy.item() == pytest.approx(math.log(2), abs=1e-15)
    assert out.expected_entropy.item() == 0.0
    assert out.mutual_info.item() == pytest.approx(math.log(2), abs=1e-15)
    assert out.variance.flatten().tolist() == pytest.approx([0.25, 0.25], abs=1e-15)
    # weights 3:1 give the mean (0.75, 0.25)
    weighted = ProbabilityEnsemble()
    weighted.add(a, weight=3.0)
    weighted.add(a.flip(1), weight=1.0)
    expected_h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert weighted.result().mutual_info.item() == pytest.approx(expected_h, abs=1e-15)


def test_bad_members_are_refused() -> None:
    ens = ProbabilityEnsemble()
    with pytest.raises(ValueError, match="no members"):
        ens.result()
    ens.add(torch.full((1, 2, 3, 3), 0.5))
    with pytest.raises(ValueError, match="shape"):
        ens.add(torch.full((1, 2, 3, 4), 0.5))
    with pytest.raises(ValueError, match="weight"):
        ens.add(torch.full((1, 2, 3, 3), 0.5), weight=0.0)
    with pytest.raises(ValueError, match="floating point"):
        ens.add(torch.ones((1, 2, 3, 3), dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_members_stay_on_the_gpu_and_match_cpu() -> None:
    members = _members(3)
    cpu, gpu = ProbabilityEnsemble(variance=True), ProbabilityEnsemble(variance=True)
    for m in members:
        cpu.add(m)
        gpu.add(m.cuda())
    a, b = cpu.result(), gpu.result()
    assert b.mean.is_cuda and b.mutual_info.is_cuda
    for name in ("mean", "entropy", "expected_entropy", "mutual_info", "variance"):
        torch.testing.assert_close(getattr(b, name).cpu(), getattr(a, name), atol=1e-12, rtol=0)
