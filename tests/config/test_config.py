"""Config loading: safe YAML, typed validation naming the key, overrides, bases, loss switching."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from segcalib.config import load_config
from segcalib.errors import ConfigError

MINIMAL = {"name": "exp", "data": {"manifest": "m.json", "patch_size": [32, 32, 32]}}


def _write(tmp_path: Path, raw: dict | str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def test_defaults_and_relative_manifest(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, MINIMAL))
    assert cfg.data.manifest == (tmp_path / "m.json").resolve()
    assert cfg.loss.name == "ce" and cfg.model.name == "unet" and cfg.train.optimizer == "adamw"
    assert cfg.roi_size == [32, 32, 32]
    assert len(cfg.config_hash()) == 16


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"train": {"epochs": "many"}}, "train.epochs"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"train": {"epoch": 3}}, "train.epoch: unknown key"),
        ({"data": {"manifest": "m.json", "patch_size": [32, 32]}}, "data.patch_size"),
        ({"data": {"manifest": "m.json", "patch_size": [30, 32, 32]}}, "multiple of 8"),
        ({"data": {"manifest": "m.json", "orientation": "RAX"}}, "data.orientation"),
        ({"loss": {"name": "mbls", "margn": 3}},
         "loss.margn: unknown parameter 'margn' of loss 'mbls'; did you mean 'margin'?"),
        ({"loss": {"name": "hinge"}}, "loss.name: unknown loss 'hinge'"),
        ({"model": {"name": "smp_unet"}}, "is a 2D model"),
        ({"model": {"name": "unet", "chanels": [8, 16]}}, "model.chanels: unknown parameter"),
        ({"optimizer": "sgd"}, "optimizer: unknown key"),
        ({"name": "../evil"}, "name"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, overrides: dict, key: str) -> None:
    raw = {**MINIMAL, **overrides}
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and key in str(info.value)


def test_missing_required_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data: required key is missing"):
        load_config(_write(tmp_path, {"name": "x"}))


def test_python_tags_are_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = f"name: !!python/object/apply:os.system ['touch {marker}']\ndata: {{manifest: m.json}}\n"
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(_write(tmp_path, text))
    assert not marker.exists()


@pytest.mark.parametrize("text, message", [("", "empty"), ("- a\n- b\n", "mapping"), ("a: [1,\n", "invalid YAML at line")])
def test_malformed_yaml(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text))


def test_overrides_with_yaml_values(tmp_path: Path) -> None:
    cfg = load_config(
        _write(tmp_path, MINIMAL),
        ["train.epochs=7", "train.lr=1.0e-4", "data.patch_size=[16,16,16]", "train.grad_clip=null", "name=other"],
    )
    assert cfg.train.epochs == 7 and cfg.train.lr == 1e-4
    assert cfg.data.patch_size == [16, 16, 16] and cfg.train.grad_clip is None and cfg.name == "other"


@pytest.mark.parametrize("item", ["train.epochs", "=3", "train..epochs=3"])
def test_malformed_override(tmp_path: Path, item: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        load_config(_write(tmp_path, MINIMAL), [item])


def test_override_through_a_value_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(_write(tmp_path, MINIMAL), ["name.x=3"])


def test_switching_loss_name_alone_drops_foreign_parameters(tmp_path: Path) -> None:
    raw = {**MINIMAL, "loss": {"name": "mbls", "margin": 6.0, "alpha": 0.2}}
    path = _write(tmp_path, raw)
    assert load_config(path).loss.params == {"margin": 6.0, "alpha": 0.2}
    assert load_config(path, ["loss.name=ce"]).loss.params == {}
    cals = load_config(path, ["loss.name=cals"])  # cals also takes a margin
    assert cals.loss.params == {"margin": 6.0}
    assert load_config(path, ["loss.name=ls", "loss.epsilon=0.05"]).loss.params == {"epsilon": 0.05}


def test_base_config_is_merged(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _write(tmp_path, {**MINIMAL, "loss": {"name": "mbls", "margin": 5}, "train": {"epochs": 9}}, "base.yaml")
    child = _write(tmp_path / "sub", {"base": "../base.yaml", "name": "child", "loss": {"name": "ls"}, "train": {"lr": 0.01}})
    cfg = load_config(child)
    assert cfg.name == "child" and cfg.train.epochs == 9 and cfg.train.lr == 0.01
    assert cfg.loss.name == "ls" and cfg.loss.params == {}  # another loss: the base's section is replaced
    assert cfg.data.manifest == (tmp_path / "m.json").resolve()  # relative to the base file


def test_base_cycle_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path, {"base": "b.yaml", **MINIMAL}, "a.yaml")
    _write(tmp_path, {"base": "a.yaml"}, "b.yaml")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "a.yaml")


def test_repository_configs_validate(repo_root: str) -> None:
    paths = sorted(Path(repo_root, "configs").rglob("*.yaml"))
    assert any(p.name == "smoke.yaml" for p in paths) and any(p.name == "demo.yaml" for p in paths)
    for path in paths:
        cfg = load_config(path)
        assert cfg.data.manifest.exists(), path


def test_an_unknown_key_gets_the_closest_valid_one(tmp_path: Path) -> None:
    raw = {**MINIMAL, "data": {**MINIMAL["data"], "patch_sise": [32, 32, 32]}}
    with pytest.raises(ConfigError, match=r"data.patch_sise: unknown key 'patch_sise'; did you mean 'patch_size'\? "
                                          r"valid keys: manifest, "):
        load_config(_write(tmp_path, raw))
