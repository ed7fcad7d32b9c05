"""svls and nacl: kernels, border handling, float64 references, MONAI's NACLLoss."""

from __future__ import annotations

import math

import monai.losses
import pytest
import torch

from segcalib.errors import ConfigError
from segcalib.losses import build_loss
from segcalib.losses._filters import erf_gaussian_1d, svls_kernel, window_counts
from segcalib.losses._inputs import LossInputs
from tests.losses import _reference as ref
from tests.losses._helpers import SHAPES, random_batch

# 2D SVLS kernel, sigma = 1, k = 3, before normalisation: edges e^-1/2, corners e^-1, centre = their
# sum 4e^-1/2 + 4e^-1; total = 2 * (4e^-1/2 + 4e^-1)
_TOTAL_2D = 2 * (4 * math.exp(-0.5) + 4 * math.exp(-1))
EDGE_2D = math.exp(-0.5) / _TOTAL_2D  # 0.07779...
CORNER_2D = math.exp(-1) / _TOTAL_2D  # 0.04719...


def test_svls_kernel_by_hand() -> None:
    k2 = svls_kernel(2, 3, 1.0)
    assert k2[1, 1].item() == pytest.approx(0.5, rel=1e-15)
    assert k2[0, 1].item() == pytest.approx(EDGE_2D, rel=1e-14)
    assert k2[0, 0].item() == pytest.approx(CORNER_2D, rel=1e-14)
    k3 = svls_kernel(3, 3, 1.0)
    # 3D: 6 faces e^-1/2, 12 edges e^-1, 8 corners e^-3/2; centre = their sum -> 0.5 after normalising
    others = 6 * math.exp(-0.5) + 12 * math.exp(-1) + 8 * math.exp(-1.5)
    assert k3[1, 1, 1].item() == pytest.approx(0.5, rel=1e-15)
    assert k3[0, 0, 0].item() == pytest.approx(math.exp(-1.5) / (2 * others), rel=1e-14)
    assert k3.sum().item() == pytest.approx(1.0, rel=1e-15)
    torch.testing.assert_close(svls_kernel(3, 5, 1.5).numpy(), ref.svls_kernel(3, 5, 1.5), rtol=1e-14, atol=0)


def test_svls_soft_targets_and_replicate_border_by_hand() -> None:
    # 3x3 image, C = 2, one foreground voxel on the top edge at (0, 1).
    target = torch.zeros(1, 3, 3, dtype=torch.long)
    target[0, 0, 1] = 1
    loss = build_loss("svls")
    logits = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    soft = loss.soft_targets(LossInputs(logits, target, -100))[0, 1]
    # (0, 1) itself: centre 0.5, plus the replicated copy of itself above it (an edge weight)
    assert soft[0, 1].item() == pytest.approx(0.5 + EDGE_2D, rel=1e-12)
    # (0, 0): the foreground is its right neighbour (edge) and, replicated above, the upper-right (corner)
    assert soft[0, 0].item() == pytest.approx(EDGE_2D + CORNER_2D, rel=1e-12)
    # (1, 1): foreground directly above (edge); (2, 1): out of reach
    assert soft[1, 1].item() == pytest.approx(EDGE_2D, rel=1e-12)
    assert soft[2, 1].item() == 0.0
    # uniform logits: loss = mean_i sum_c s_ic * ln 2 = ln 2 (soft targets sum to 1)
    assert loss(logits, target).item() == pytest.approx(math.log(2), rel=1e-12)


@pytest.mark.parametrize("dims", sorted(SHAPES))
@pytest.mark.parametrize("with_ignore", [False, True])
def test_svls_matches_float64_reference(dims: str, with_ignore: bool) -> None:
    logits, target = random_batch(SHAPES[dims], dtype=torch.float64, seed=21)
    if with_ignore:
        target[torch.rand(target.shape, generator=torch.Generator().manual_seed(3)) < 0.3] = -100
    expected = ref.svls(logits.numpy(), target.numpy(), 3, 1.0)
    assert build_loss("svls")(logits, target).item() == pytest.approx(expected, rel=1e-10)
    expected5 = ref.svls(logits.numpy(), target.numpy(), 5, 2.0)
    assert build_loss("svls", kernel_size=5, sigma=2.0)(logits, target).item() == pytest.approx(expected5, rel=1e-10)


def test_nacl_zero_border_by_hand() -> None:
    # 3x3 image, C = 2, foreground at the centre, logits 0. With zero padding and ones/9:
    # tau_1 = 1/9 everywhere; tau_0 = 3/9 at corners (4 voxels inside the window, 1 foreground),
    # 5/9 at edges, 8/9 at the centre. Sum of tau = 9/9 + (4*3 + 4*5 + 8)/9 = 49/9 over 18 entries.
    target = torch.zeros(1, 3, 3, dtype=torch.long)
    target[0, 1, 1] = 1
    logits = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    loss = build_loss("nacl", alpha=0.1)
    assert loss(logits, target).item() == pytest.approx(math.log(2) + 0.1 * 49 / 162, rel=1e-12)
    assert loss.last_components["penalty"].item() == pytest.approx(49 / 162, rel=1e-12)
    l2 = build_loss("nacl", distance="l2")
    l2(logits, target)
    # squares: 9 * (1/9)^2 + (4 * 9 + 4 * 25 + 64)/81 = (9 + 200)/81 over 18 entries
    assert l2.last_components["penalty"].item() == pytest.approx(209 / 81 / 18, rel=1e-12)


@pytest.mark.parametrize("dims", sorted(SHAPES))
@pytest.mark.parametrize("distance", ["l1", "l2"])
@pytest.mark.parametrize("with_ignore", [False, True])
def test_nacl_matches_float64_reference(dims: str, distance: str, with_ignore: bool) -> None:
    logits, target = random_batch(SHAPES[dims], dtype=torch.float64, seed=22)
    if with_ignore:
        target[torch.rand(target.shape, generator=torch.Generator().manual_seed(4)) < 0.3] = -100
    for size in (3, 5):
        expected = ref.nacl(logits.numpy(), target.numpy(), size, 0.3, distance)
        loss = build_loss("nacl", kernel_size=size, alpha=0.3, distance=distance)
        assert loss(logits, target).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("dims", sorted(SHAPES))
@pytest.mark.parametrize("kernel_ops", ["mean", "gaussian"])
@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_nacl_matches_monai(dims: str, kernel_ops: str, distance: str) -> None:
    logits, target = random_batch(SHAPES[dims], scale=1.0, seed=23)
    classes, spatial = logits.shape[1], logits.dim() - 2
    twin = monai.losses.NACLLoss(classes, spatial, kernel_size=3, kernel_ops=kernel_ops, distance_type=distance, alpha=0.2)
    ours = build_loss("nacl", kernel_size=3, kernel_ops=kernel_ops, distance=distance, alpha=0.2)
    torch.testing.assert_close(ours(logits, target), twin(logits, target), rtol=1e-5, atol=1e-6)


def test_erf_gaussian_matches_monai() -> None:
    from monai.networks.layers.convutils import gaussian_1d

    for sigma in (0.5, 1.0, 2.0):
        expected = gaussian_1d(torch.tensor(sigma), truncated=4.0, approx="erf").double()
        torch.testing.assert_close(erf_gaussian_1d(sigma), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["svls", "nacl"])
def test_gradcheck(name: str) -> None:
    logits, target = random_batch((1, 3, 3, 4), dtype=torch.float64, scale=1.0, seed=24)
    target[0, 0, 0] = -100
    loss = build_loss(name)
    assert torch.autograd.gradcheck(lambda z: loss(z, target), (logits.requires_grad_(),))


@pytest.mark.parametrize("name", ["svls", "nacl"])
def test_spatial_losses_need_2d_or_3d(name: str) -> None:
    logits, target = random_batch((2, 3, 8))
    with pytest.raises(ValueError, match="2D and 3D"):
        build_loss(name)(logits, target)


def test_invalid_kernel_parameters() -> None:
    with pytest.raises(ConfigError, match="loss 'svls': parameter 'kernel_size' must be an odd integer >= 3"):
        build_loss("svls", kernel_size=1)
    with pytest.raises(ConfigError, match="loss 'nacl': parameter 'kernel_size'"):
        build_loss("nacl", kernel_size=4)
    with pytest.raises(ConfigError, match="parameter 'kernel_ops' must be one of 'mean', 'gaussian'"):
        build_loss("nacl", kernel_ops="box")
    with pytest.raises(ConfigError, match="parameter 'distance'"):
        build_loss("nacl", distance="cosine")
    with pytest.raises(ConfigError, match="parameter 'sigma'"):
        build_loss("svls", sigma=0.0)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("size", [3, 5, 7])
def test_window_counts_equal_zero_padded_avg_pool(dims: int, size: int) -> None:
    # counts / k^d = avg_pool of the one-hot labels (zero padding, count_include_pad) + the outside share on class 0
    pool = {2: torch.nn.functional.avg_pool2d, 3: torch.nn.functional.avg_pool3d}[dims]
    g = torch.Generator().manual_seed(size + dims)
    shape = (2, 9, 8, 7)[: 1 + dims]
    labels = torch.randint(0, 3, shape, generator=g)
    valid = torch.rand(shape, generator=g) > 0.2
    onehot = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).double() * valid.unsqueeze(1)
    shares = pool(onehot, size, stride=1, padding=size // 2, count_include_pad=True)
    inside = pool(torch.ones(1, 1, *shape[1:], dtype=torch.float64), size, stride=1, padding=size // 2, count_include_pad=True)
    shares[:, :1] += 1 - inside
    counts = window_counts(labels, valid, 3, size)
    assert counts.dtype == (torch.uint8 if size**dims <= 255 else torch.int32)
    assert torch.equal(counts.double(), torch.round(shares * size**dims))
    assert torch.allclose(counts.double() / size**dims, shares, rtol=0, atol=1e-12)
