"""build_loss / list_losses / loss_parameters / register_loss."""

from __future__ import annotations

import inspect

import pytest
import torch

from segcalib.errors import ConfigError
from segcalib.losses import REQUIRED, CalibrationLoss, build_loss, list_losses, loss_parameters, register_loss
from segcalib.losses.registry import _REGISTRY

SPEC_DEFAULTS = {
    "ce": {"ignore_index": -100},
    "dice": {"include_background": True},
    "focal": {"gamma": 3.0},
    "focal_adaptive": {"gamma": 3.0},
    "ls": {"epsilon": 0.1},
    "ecp": {"alpha": 0.1},
    "logit_l1": {"alpha": 0.01},
    "mbls": {"margin": 10.0, "alpha": 0.1, "ignore_index": -100},
    "mbls_dice": {"margin": 10.0, "alpha": 0.1},
    "svls": {"kernel_size": 3, "sigma": 1.0},
    "nacl": {"kernel_size": 3, "alpha": 0.1, "kernel_ops": "mean", "distance": "l1"},
    "cals": {
        "num_classes": REQUIRED, "margin": 10.0, "penalty": "phr", "normalize": True, "lambda_min": 1e-6,
        "lambda_max": 1e6, "lambda_step": 1, "rho_init": 1.0, "rho_max": 10.0, "rho_step": 10, "gamma": 1.2,
        "tau": 0.9, "ignore_index": -100,
    },
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SPEC_DEFAULTS))
def test_spec_parameter_names_and_defaults(name: str) -> None:
    params = loss_parameters(name)
    for key, default in SPEC_DEFAULTS[name].items():
        assert params[key] == default or params[key] is default, (name, key)


@pytest.mark.parametrize("name", list_losses())
def test_every_loss_accepts_ignore_index_and_builds_from_its_defaults(name: str) -> None:
    params = loss_parameters(name)
    assert params["ignore_index"] == -100
    filled = {k: (3 if v is REQUIRED else v) for k, v in params.items()}
    loss = build_loss(name, **filled)
    assert isinstance(loss, CalibrationLoss) and loss.loss_name == name
    assert loss.__doc__ and len(loss.__doc__.strip()) > 40


def test_unknown_loss_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown loss 'mlbs'; did you mean 'mbls'\? valid losses: cals, .*mbls"):
        build_loss("mlbs")
    with pytest.raises(ConfigError, match="unknown loss"):
        loss_parameters("nope")


def test_unknown_parameter_names_loss_parameter_and_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        build_loss("mbls", marginn=3.0)
    message = str(info.value)
    assert "'mbls'" in message and "'marginn'" in message and "margin, alpha, ignore_index" in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "name,params,bad",
    [
        ("focal", {"gamma": -1.0}, "gamma"),
        ("ls", {"epsilon": 1.5}, "epsilon"),
        ("ecp", {"alpha": float("nan")}, "alpha"),
        ("dice", {"include_background": "yes"}, "include_background"),
        ("ce", {"ignore_index": 1.5}, "ignore_index"),
        ("cals", {"num_classes": 3, "lambda_step": 0}, "lambda_step"),
        ("cals", {"num_classes": 3, "gamma": 0.5}, "gamma"),
        ("cals_heuristic", {"num_classes": 3, "lambda_init": 1e7}, "lambda_init"),
    ],
)
def test_invalid_values_name_the_parameter(name: str, params: dict, bad: str) -> None:
    with pytest.raises(ConfigError, match=f"loss '{name}': parameter '{bad}'"):
        build_loss(name, **params)


def test_integers_are_accepted_for_float_parameters() -> None:
    assert build_loss("mbls", margin=5).margin == 5.0


def test_register_loss_adds_a_loss_and_refuses_duplicates() -> None:
    @register_loss("_test_square")
    class Square(CalibrationLoss):
        """Mean squared logit, for this test only: ``mean_{i,k} z_ik^2``."""

        def __init__(self, *, scale: float = 1.0, ignore_index: int = -100) -> None:
            super().__init__(ignore_index=ignore_index)
            self.scale = scale

        def compute(self, inputs):
            value = self.scale * inputs.class_mean(inputs.logits.square())
            return value, {"square": value}

    try:
        assert "_test_square" in list_losses()
        assert loss_parameters("_test_square") == {"scale": 1.0, "ignore_index": -100}
        loss = build_loss("_test_square", scale=2.0)
        assert loss(torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)).item() == 2.0
        with pytest.raises(ValueError, match="already registered"):
            register_loss("_test_square")(Square)
    finally:
        _REGISTRY.pop("_test_square", None)


def test_constructors_are_keyword_only() -> None:
    for name in list_losses():
        cls = _REGISTRY[name]
        kinds = {p.kind for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}
        # ``**params`` passes the base class's keyword parameters on; nothing is positional
        assert kinds - {inspect.Parameter.VAR_KEYWORD} == {inspect.Parameter.KEYWORD_ONLY}, name


def test_a_subclass_passing_params_on_has_its_base_class_parameters() -> None:
    assert loss_parameters("cals_heuristic") == {**loss_parameters("cals"), "lambda_init": 1.0}
    loss = build_loss("cals_heuristic", num_classes=3, margin=4.0, rho_step=0, lambda_init=2.0)
    assert (loss.margin, loss.rho_step, loss.lambda_init) == (4.0, 0, 2.0)
    assert loss.lambdas.tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(ConfigError, match="loss.marginn: unknown parameter"):
        build_loss("cals_heuristic", num_classes=3, marginn=4.0)
