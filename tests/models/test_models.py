"""Every registered model gets the same checks: forward shape, backward, any valid resolution."""

from __future__ import annotations

import pytest
import torch

from segcalib.errors import ConfigError
from segcalib.models import build_model, list_models, model_parameters, size_divisor

SMALL = {  # small variants so the checks stay fast; defaults are exercised by the registry test
    "unet": {"channels": (4, 8, 16), "strides": (2, 2)},
    "basic_unet": {"features": (4, 4, 8, 16, 32, 4)},
    "dynunet": {"filters": (4, 8, 16), "strides": (1, 2, 2)},
    "smp_unet": {"encoder_name": "resnet18", "encoder_depth": 5, "decoder_channels": (16, 8, 8, 4, 4)},
}
CASES = [(name, dims) for name in list_models() for dims in (2, 3) if name in list_models(dims)]


def test_every_model_has_a_test_variant() -> None:
    assert sorted(SMALL) == list_models()
    assert ("smp_unet", 2) in CASES and ("smp_unet", 3) not in CASES
    assert {("unet", 3), ("basic_unet", 3), ("dynunet", 3), ("unet", 2)} <= set(CASES)


@pytest.mark.parametrize("name, dims", CASES)
def test_forward_backward_any_resolution(name: str, dims: int) -> None:
    params = SMALL[name]
    net = build_model(name, spatial_dims=dims, in_channels=2, out_channels=3, **params)
    step = size_divisor(name, params)
    for sizes in ([2 * step] * dims, [step * k for k in (1, 2, 3)][:dims]):
        x = torch.randn(2, 2, *sizes, requires_grad=True)
        y = net(x)
        assert y.shape == (2, 3, *sizes)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", list_models())
def test_defaults_build_without_downloads(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    def refuse(*args, **kwargs):
        raise AssertionError("a model tried to download weights")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    dims = 3 if 3 in (d for d in (2, 3) if name in list_models(d)) else 2
    net = build_model(name, spatial_dims=dims, in_channels=1, out_channels=2)
    assert sum(p.numel() for p in net.parameters()) > 0
    assert set(model_parameters(name)) >= set(SMALL[name])


def test_unknown_names_and_parameters() -> None:
    with pytest.raises(ConfigError, match="unknown model 'vnet'"):
        build_model("vnet", 3, 1, 2)
    with pytest.raises(ConfigError, match="model.depth: unknown parameter"):
        build_model("unet", 3, 1, 2, depth=4)
    with pytest.raises(ConfigError, match="strides needs 2 entries"):
        build_model("unet", 3, 1, 2, channels=(4, 8, 16), strides=(2,))
    with pytest.raises(ConfigError, match="unknown smp encoder"):
        build_model("smp_unet", 2, 1, 2, encoder_name="resnet9000")
