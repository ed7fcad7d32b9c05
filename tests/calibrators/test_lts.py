"""Local temperature scaling: a constant map is temperature scaling, a varying one is learned, memory bounded."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from segcalib.calibrators import build_calibrator, load_calibrator, save_calibrator
from segcalib.calibrators.lts import LocalTemperatureScaling
from segcalib.errors import ConfigError, DataError
from tests.calibrators._single_thread import single_thread  # noqa: F401 (autouse fixture)

SMALL = {"hidden": 4, "layers": 2}


def _random_case(g: torch.Generator, shape, num_classes: int = 3):
    z = torch.randn(1, num_classes, *shape, generator=g) * 3
    y = torch.distributions.Categorical(logits=z.movedim(1, -1) / 2).sample()
    return z, y


def test_constant_output_lts_is_temperature_scaling() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    cases = [_random_case(g, (7, 6, 5)) for _ in range(3)]
    # whole cases as crops, no training steps: the network is the constant T fitted on every voxel
    lts = build_calibrator("lts", 3, crop=8, crops_per_case=1, steps=0, **SMALL)
    ts = build_calibrator("temperature", 3)
    for z, y in cases:
        lts.update(z, y)
        ts.update(z, y)
    lts.fit()
    ts.fit()
    t = ts.get_params()["temperature"]
    assert t == pytest.approx(2.0, rel=0.15)
    z = cases[0][0]
    assert torch.allclose(lts.temperature_map(z), torch.full((1, 1, 7, 6, 5), t), rtol=1e-4)
    assert torch.allclose(lts.transform(z), ts.transform(z), atol=1e-5)
    # any weights whose last layer is zero give softmax(z / (softplus(bias) + t_floor))
    weights = {k: v.clone() for k, v in lts.tensors().items()}
    last = max(k for k in weights if k.endswith(".bias"))
    weights[last].fill_(0.3)
    weights[last.replace("bias", "weight")].zero_()
    constant = LocalTemperatureScaling.from_params(3, lts.get_params(), weights)
    expected = torch.softmax(z.double() / (math.log1p(math.exp(0.3)) + 0.05), dim=1)
    assert torch.allclose(constant.transform(z).double(), expected, atol=1e-6)


def _two_regime_cases(n: int, seed: int, size: int = 32):
    """2D cases whose true temperature is 0.5 where the image is bright and 2 where it is dark."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for _ in range(n):
        bright = torch.zeros(size, size, dtype=torch.bool)
        cut = int(torch.randint(8, size - 8, (1,), generator=g))
        bright[:, :cut] = True
        image = bright.float()[None, None] * 2 + torch.randn(1, 1, size, size, generator=g) * 0.1
        z = torch.randn(1, 3, size, size, generator=g) * 4
        t = torch.where(bright, 0.5, 2.0)
        p = torch.softmax(z / t, dim=1)
        y = torch.multinomial(p[0].reshape(3, -1).T, 1, generator=g).reshape(1, size, size)
        cases.append((z, y, image, bright))
    return cases


def test_lts_learns_a_spatially_varying_temperature_from_the_image() -> None:
    torch.manual_seed(0)
    train, test = _two_regime_cases(6, seed=2), _two_regime_cases(3, seed=3)
    lts = build_calibrator("lts", 3, crop=16, crops_per_case=4, use_image=True, hidden=8, layers=2,
                           steps=300, batch_crops=4, lr=0.01)
    ts = build_calibrator("temperature", 3)
    for z, y, image, _ in train:
        lts.update(z, y, image=image)
        ts.update(z, y)
    lts.fit()
    ts.fit()

    def nll(cal) -> float:
        return sum(float(F.nll_loss(cal.transform(z, image=im).log(), y)) for z, y, im, _ in test) / len(test)

    oracle = sum(
        float(F.nll_loss(torch.softmax(z / torch.where(b, 0.5, 2.0), dim=1).log(), y)) for z, y, _, b in test
    ) / len(test)
    # LTS closes more than half of the gap between one global T and the true temperature map
    assert nll(lts) < nll(ts) - 0.5 * (nll(ts) - oracle)
    z, _, image, bright = test[0]
    t = lts.temperature_map(z, image)[0, 0]
    inner_bright = bright & torch.roll(bright, 2, 1) & torch.roll(bright, -2, 1)
    inner_dark = ~bright & ~torch.roll(bright, 2, 1) & ~torch.roll(bright, -2, 1)
    assert float(t[inner_bright].median()) == pytest.approx(0.5, rel=0.3)
    assert float(t[inner_dark].median()) == pytest.approx(2.0, rel=0.3)
    out = lts.transform(z, image=image)
    assert torch.equal(out.argmax(1), z.argmax(1))
    with pytest.raises(DataError, match="image"):
        lts.transform(z)


def test_buffer_is_bounded_and_crops_come_from_the_fit_region() -> None:
    g = torch.Generator().manual_seed(4)
    lts = build_calibrator("lts", 3, crop=4, crops_per_case=3, max_voxels=5 * 4**3, **SMALL)
    assert lts.capacity == 5
    for _ in range(10):
        z, y = _random_case(g, (9, 10, 11))
        mask = torch.zeros(1, 9, 10, 11, dtype=torch.bool)
        mask[0, 6:, :3, 8:] = True
        lts.update(z, y, mask)
    assert len(lts.crops) == 5 and lts.offered == 30
    assert sum(c["m"].numel() for c in lts.crops) <= 5 * 4**3
    for crop in lts.crops:
        assert crop["z"].shape == (3, 4, 4, 4) and crop["m"].any()
        assert crop["m"].sum() < crop["m"].numel()  # the region is a corner block: crops straddle it
    # streaming the same cases one by one or merging two halves gives the same buffer
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    cases = [_random_case(g1, (6, 6, 6)) for _ in range(4)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(cases, [_random_case(g2, (6, 6, 6)) for _ in range(4)]))
    one = build_calibrator("lts", 3, crop=4, **SMALL)
    one.update(torch.cat([c[0] for c in cases]), torch.cat([c[1] for c in cases]))
    streamed = build_calibrator("lts", 3, crop=4, **SMALL)
    for z, y in cases:
        streamed.update(z, y)
    assert all(torch.equal(a["z"], b["z"]) for a, b in zip(one.crops, streamed.crops))


def test_weights_round_trip_and_bad_weights(tmp_path) -> None:
    g = torch.Generator().manual_seed(6)
    z, y = _random_case(g, (12, 10))
    cal = build_calibrator("lts", 3, crop=8, steps=5, **SMALL)
    cal.update(z, y)
    cal.fit()
    assert sorted(cal.tensors()) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]
    save_calibrator(cal, tmp_path / "cal")
    assert (tmp_path / "cal" / "weights.safetensors").exists()
    loaded = load_calibrator(tmp_path / "cal")
    assert torch.equal(loaded.transform(z), cal.transform(z))
    broken = dict(cal.tensors())
    broken["net.0.weight"] = broken["net.0.weight"][:1]
    with pytest.raises(DataError, match="net.0.weight"):
        LocalTemperatureScaling.from_params(3, cal.get_params(), broken)
    with pytest.raises(DataError, match="fitted for 2D"):
        cal.transform(torch.randn(1, 3, 4, 4, 4))


def test_device_option() -> None:
    with pytest.raises(ConfigError, match="device"):
        build_calibrator("lts", 3, device="tpu")
    if not torch.cuda.is_available():
        cal = build_calibrator("lts", 3, crop=8, steps=1, device="cuda", **SMALL)
        z, y = _random_case(torch.Generator().manual_seed(7), (9, 8))
        cal.update(z, y)
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            cal.fit()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_and_transform_match_cpu() -> None:
    g = torch.Generator().manual_seed(8)
    cases = [_random_case(g, (12, 10, 8)) for _ in range(3)]
    fitted = {}
    for device in ("cpu", "cuda"):
        cal = build_calibrator("lts", 3, crop=8, steps=20, device=device, **SMALL)
        for z, y in cases:
            cal.update(z.to(device), y.to(device))
        fitted[device] = cal.fit()
    z, y = cases[0]
    # the same training on two devices: convolution gradients sum in another order, so 20 Adam
    # steps land on slightly different networks (measured on an H200: the maps differ by more than
    # 1e-3 relative); what must agree is the calibration they give
    nll = {d: torch.nn.functional.nll_loss(fitted[d].transform(z.to(d)).clamp_min(1e-12).log().cpu(), y.cpu()).item()
           for d in fitted}
    assert nll["cuda"] == pytest.approx(nll["cpu"], rel=1e-2)
    assert torch.allclose(fitted["cuda"].temperature_map(z).cpu(), fitted["cpu"].temperature_map(z), rtol=0.1)
    # one network on two devices: its convolutions sum in another order there too (measured on an
    # H200, 2026-12-04: probabilities up to 1.6e-5 apart)
    assert torch.allclose(fitted["cpu"].transform(z.cuda()).cpu(), fitted["cpu"].transform(z), atol=1e-4)
