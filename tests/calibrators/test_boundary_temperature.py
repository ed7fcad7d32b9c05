"""Boundary-distance temperature: hand-checked signed distances, recovery of a known T(d), argmax kept."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from segcalib.calibrators import build_calibrator
from segcalib.calibrators.boundary_temperature import FAR_MM, signed_boundary_distance
from tests.calibrators._single_thread import single_thread  # noqa: F401 (autouse fixture)

TRUE = {"a": 0.3, "b": 0.25, "c": 0.8, "s": 3.0}
SPACING = (1.0, 1.0, 1.5)


def _label_logits(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels, num_classes).movedim(-1, 1).float() * 4


def test_signed_distance_by_hand_with_anisotropic_spacing() -> None:
    labels = torch.zeros(1, 3, 10, dtype=torch.long)
    labels[..., 5:] = 1  # predicted foreground: columns 5..9
    d = signed_boundary_distance(_label_logits(labels, 2), [(1.0, 0.5)])
    expected = torch.tensor([2.5, 2.0, 1.5, 1.0, 0.5, -0.5, -1.0, -1.5, -2.0, -2.5]).expand(1, 3, 10)
    assert torch.equal(d, expected)
    # two foreground classes side by side: the distance is to the nearest voxel of *another* class
    labels[..., 8:] = 2
    d = signed_boundary_distance(_label_logits(labels, 3), [(1.0, 0.5)])
    assert d[0, 0].tolist() == [2.5, 2.0, 1.5, 1.0, 0.5, -0.5, -1.0, -0.5, -0.5, -1.0]
    # a single predicted class has no boundary
    assert torch.equal(signed_boundary_distance(torch.zeros(1, 2, 4, 4)), torch.full((1, 4, 4), FAR_MM))


def _log_t(d: torch.Tensor, a: float, b: float, c: float, s: float) -> torch.Tensor:
    return a + b * torch.tanh(d / s) + c * torch.exp(-d * d / (2 * s * s))


def _cases(seed: int, n: int = 4, shape=(24, 24, 16)):
    """Two-class balls whose labels are drawn from softmax(z / T_true(d))."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(k, dtype=torch.float32) for k in shape], indexing="ij"))
    grid = grid * torch.tensor(SPACING).view(3, 1, 1, 1)
    out = []
    for _ in range(n):
        centre = (torch.rand(3, generator=g) * 4 + torch.tensor([10.0, 10.0, 10.0])).view(3, 1, 1, 1)
        radius = float(torch.rand(1, generator=g)) * 2 + 6
        z1 = -(((grid - centre) ** 2).sum(0).sqrt() - radius) * 1.2 + torch.randn(shape, generator=g) * 0.5
        z = torch.stack([torch.zeros(shape), z1])[None]
        d = signed_boundary_distance(z, [SPACING])
        t = _log_t(d, **TRUE).exp().unsqueeze(1)
        y = (torch.rand((1, *shape), generator=g) < torch.softmax(z / t, dim=1)[:, 1]).long()
        out.append((z, y))
    return out


def _nll(cal, cases) -> float:
    total = sum(
        float(F.nll_loss(cal.transform(z, spacing=[SPACING]).double().clamp_min(1e-12).log(), y)) for z, y in cases
    )
    return total / len(cases)


def test_fit_recovers_a_known_distance_dependent_temperature() -> None:
    train, test = _cases(0), _cases(1)
    boundary = build_calibrator("boundary_temperature", 2, max_voxels=60_000)
    glob = build_calibrator("temperature", 2, max_voxels=60_000)
    for z, y in train:
        boundary.update(z, y, spacing=[SPACING])
        glob.update(z, y)
    boundary.fit()
    glob.fit()
    d = torch.linspace(-6, 6, 49, dtype=torch.float64)
    truth = _log_t(d, **TRUE).exp()
    fitted = boundary.temperature_at(d)
    assert (fitted / truth - 1).abs().max() < 0.12
    # one global T cannot follow the bump: its error against the truth is far larger
    assert (glob.get_params()["temperature"] / truth - 1).abs().max() > 0.4
    assert _nll(boundary, test) < _nll(glob, test) - 0.003
    assert boundary.get_params()["s"] == pytest.approx(TRUE["s"], rel=0.25)


def test_argmax_and_order_preserved_and_spacing_matters() -> None:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 9, 8, 7, generator=g) * 3
    y = torch.randint(0, 4, (2, 9, 8, 7), generator=g)
    cal = build_calibrator("boundary_temperature", 4, max_voxels=5000)
    cal.update(z, y, spacing=[SPACING, (2.0, 2.0, 2.0)])
    cal.fit()
    # a clearly non-constant T(d), so that spacing changes the output
    params = {**cal.get_params(), "a": 0.2, "b": 0.5, "c": 1.0, "s": 2.0}
    cal = type(cal).from_params(4, params)
    out = cal.transform(z, spacing=[SPACING, SPACING])
    assert torch.equal(out.argmax(1), z.argmax(1))
    ranks_in, ranks_out = z.argsort(dim=1), out.argsort(dim=1)
    distinct = (out.sort(dim=1).values.diff(dim=1) > 1e-6).all(dim=1)  # float32 ties aside
    assert distinct.float().mean() > 0.9
    assert torch.equal(ranks_in.movedim(1, -1)[distinct], ranks_out.movedim(1, -1)[distinct])
    other = cal.transform(z, spacing=[(3.0, 3.0, 3.0), SPACING])
    assert not torch.allclose(other[0], out[0]) and torch.equal(other[1], out[1])
    # the temperature is exactly the closed form at each voxel's distance
    d = signed_boundary_distance(z[:1], [SPACING]).double()
    t = _log_t(d, 0.2, 0.5, 1.0, 2.0).exp().unsqueeze(1)
    assert torch.allclose(out[:1].double(), torch.softmax(z[:1].double() / t, dim=1), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_distances_and_transform_match_cpu() -> None:
    (z, y), = _cases(2, n=1)
    cal = build_calibrator("boundary_temperature", 2, max_voxels=20_000)
    cal.update(z, y, spacing=[SPACING])
    cal.fit()
    on_gpu = signed_boundary_distance(z.cuda(), [SPACING]).cpu()
    assert torch.allclose(on_gpu, signed_boundary_distance(z, [SPACING]), atol=1e-4)
    on_gpu = cal.transform(z.cuda(), spacing=[SPACING]).cpu()
    assert torch.allclose(on_gpu, cal.transform(z, spacing=[SPACING]), atol=1e-5)


def test_min_temperature_bounds_the_far_field_and_old_files_keep_their_bound() -> None:
    from segcalib.calibrators.boundary_temperature import BoundaryTemperatureScaling
    from segcalib.errors import ConfigError

    old = {"seed": 0, "max_voxels": 1000, "scale_mm": 3.0, "max_iter": 5, "a": -11.0, "b": 0.0, "c": 12.0, "s": 4.0}
    legacy = BoundaryTemperatureScaling.from_params(2, old)
    bounded = BoundaryTemperatureScaling.from_params(2, {**old, "min_temperature": 0.5})
    d = torch.tensor([0.0, 30.0, -30.0], dtype=torch.float64)
    # by hand: log T(0) = -11 + 12 = 1; far away log T -> -11, clamped to log 0.01 (legacy) or log 0.5
    assert legacy.temperature_at(d).tolist() == pytest.approx([math.e, 0.01, 0.01], rel=1e-6)
    assert bounded.temperature_at(d).tolist() == pytest.approx([math.e, 0.5, 0.5], rel=1e-6)
    assert BoundaryTemperatureScaling(2).min_temperature == 0.5
    for bad in (1.0, 0.001, float("nan"), "0.5"):
        with pytest.raises(ConfigError, match="min_temperature"):
            BoundaryTemperatureScaling(2, min_temperature=bad)
