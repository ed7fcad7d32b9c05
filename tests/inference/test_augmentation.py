"""Test-time flips and MC dropout: flips are undone, a flip-equivariant network gains nothing from
TTA, dropout passes differ while normalisation stays in eval mode, and models without dropout are
refused."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from segcalib.errors import ConfigError
from segcalib.inference.augmentation import Flip, enable_mc_dropout, flip_transforms, member_predictions
from segcalib.inference.ensemble import ProbabilityEnsemble
from segcalib.inference.sliding_window import SlidingWindow, predict_logits


class SymmetricConvNet(nn.Module):
    """A 3x3x3 convolution whose kernel is the same under every flip, zero-padded: equivariant to flips."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 3, kernel_size=3, padding=1)
        with torch.no_grad():
            w = self.conv.weight
            flips = [dims for k in range(4) for dims in itertools.combinations((2, 3, 4), k)]
            w.copy_(sum(w.flip(list(d)) if d else w for d in flips) / len(flips))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x)) * 4


class RampNet(nn.Module):
    """Logits ``(x, ramp along the first spatial axis)``: not equivariant to flips of that axis."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-2, 2, x.shape[2]).view(1, 1, -1, *([1] * (x.dim() - 3))).expand_as(x)
        return torch.cat([x, ramp], dim=1)


class DropoutNet(nn.Module):
    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 1)
        self.norm = nn.BatchNorm3d(4)
        self.drop = nn.Dropout3d(p)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.norm(self.conv(x))))


def test_flip_transforms_are_all_combinations_identity_first() -> None:
    flips = flip_transforms(3)
    assert len(flips) == 8 and flips[0] == Flip(()) and len(set(flips)) == 8
    assert {f.axes for f in flips} == {(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)}
    assert [f.axes for f in flip_transforms(3, axes=(2, 1))] == [(), (1,), (2,), (1, 2)]
    assert [f.name for f in flip_transforms(2, axes=[0])] == ["identity", "flip0"]
    with pytest.raises(ConfigError, match="spatial axes"):
        flip_transforms(2, axes=(2,))


def test_flip_undo_restores_and_moves_only_spatial_axes() -> None:
    x = torch.arange(2 * 3 * 4 * 5.0).view(1, 2, 3, 4, 5)
    f = Flip((0, 2))
    assert torch.equal(f.apply(x), x.flip([2, 4]))
    assert torch.equal(f.undo(f.apply(x)), x)
    assert f.apply(x)[0, 1, 0, 0, 0] == x[0, 1, 2, 0, 4]


def test_tta_on_a_flip_equivariant_network_equals_no_tta() -> None:
    net = SymmetricConvNet().eval()
    image = torch.randn(2, 2, 6, 7, 5)
    plain = torch.softmax(net(image), dim=1).double()
    ensemble = ProbabilityEnsemble()
    window = SlidingWindow(roi_size=[6, 7, 5], amp=False)  # one window: stitching adds nothing
    n = 0
    for probs in member_predictions(lambda x: predict_logits(net, x, window), image, tta=True):
        ensemble.add(probs)
        n += 1
    out = ensemble.result()
    assert n == 8
    torch.testing.assert_close(out.mean, plain, atol=1e-6, rtol=0)
    assert out.mutual_info.max().item() < 1e-6
    # the network is far from invariant: without undoing the flips the members would disagree
    assert (torch.softmax(net(image.flip(2)), 1) - plain.float()).abs().max().item() > 0.1


def test_flips_are_undone_on_a_network_that_is_not_equivariant() -> None:
    image = torch.randn(1, 1, 5, 3, 4)
    members = list(member_predictions(RampNet(), image, tta=[Flip(()), Flip((0,))]))
    ramp = torch.linspace(-2, 2, 5).view(1, 1, 5, 1, 1).expand_as(image)
    # member 2 = flip(softmax(flip(x), ramp)) = softmax(x, flipped ramp), worked out by hand
    torch.testing.assert_close(members[0], torch.softmax(torch.cat([image, ramp], 1), 1))
    torch.testing.assert_close(members[1], torch.softmax(torch.cat([image, ramp.flip(2)], 1), 1))
    # flips of the other axes leave the ramp alone, so their members equal the identity's
    others = list(member_predictions(RampNet(), image, tta=flip_transforms(3, axes=(1, 2))))
    assert len(others) == 4
    for m in others[1:]:
        torch.testing.assert_close(m, others[0])


def test_mc_dropout_passes_differ_norm_stays_in_eval_and_modes_are_restored() -> None:
    net = DropoutNet()
    net.train()
    image = torch.randn(1, 1, 4, 4, 4)
    seen = []
    for probs in member_predictions(net, image, tta=[Flip(()), Flip((1,))], mc_samples=3, model=net):
        assert net.drop.training and not net.norm.training and not net.conv.training
        seen.append(probs)
    assert len(seen) == 6
    assert (seen[0] - seen[2]).abs().max().item() > 1e-3  # two dropout passes differ
    assert all(m.training for m in net.modules())  # train mode restored
    torch.manual_seed(5)
    first = list(member_predictions(net, image, mc_samples=2, model=net))
    torch.manual_seed(5)
    again = list(member_predictions(net, image, mc_samples=2, model=net))
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # seeded: repeatable


def test_enable_mc_dropout_switches_only_dropout_layers() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.AlphaDropout(0.2), nn.Dropout(0.1))
    active = enable_mc_dropout(net)
    assert active == [net[2], net[3]]
    assert [m.training for m in net] == [False, False, True, True]


def test_mc_dropout_is_refused_without_dropout() -> None:
    with pytest.raises(ConfigError, match="no dropout layer"):
        enable_mc_dropout(nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU()))
    with pytest.raises(ConfigError, match="p=0"):
        enable_mc_dropout(DropoutNet(p=0.0))
    net = nn.Conv3d(1, 2, 1)
    with pytest.raises(ConfigError, match="MC dropout needs a model trained with dropout"):
        list(member_predictions(net, torch.randn(1, 1, 2, 2, 2), mc_samples=4, model=net))
    with pytest.raises(ConfigError, match="needs the model"):
        list(member_predictions(net, torch.randn(1, 1, 2, 2, 2), mc_samples=4))
    with pytest.raises(ConfigError, match="mc_samples"):
        list(member_predictions(net, torch.randn(1, 1, 2, 2, 2), mc_samples=0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tta_on_the_gpu_with_sliding_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 rounding differs between flips
    net = SymmetricConvNet().cuda().eval()
    image = torch.randn(1, 2, 6, 7, 5, device="cuda")
    window = SlidingWindow(roi_size=[6, 7, 5], amp=False)
    ensemble = ProbabilityEnsemble()
    for probs in member_predictions(lambda x: predict_logits(net, x, window), image, tta=True):
        assert probs.is_cuda
        ensemble.add(probs)
    with torch.no_grad():
        plain = torch.softmax(net(image), dim=1).double()
    torch.testing.assert_close(ensemble.result().mean, plain, atol=1e-5, rtol=0)
