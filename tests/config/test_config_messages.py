"""Config errors name the file: a repeated YAML key (with both lines), a bad ``base:`` (with the
file that refers to it), a loss or model parameter that the registries refuse (with the key)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segcalib.cli import main
from segcalib.config import load_config
from segcalib.errors import ConfigError
from tests.conftest import SMOKE_CONFIG

_SECTIONS = {
    "name": "name: exp",
    "data": "data:\n  manifest: m.json\n  patch_size: [32, 32, 32]",
    "train": "train:\n  epochs: 3",
    "loss": "loss:\n  name: ce",
    "model": "model:\n  name: unet",
}


@settings(max_examples=40, deadline=None)
@given(order=st.permutations(list(_SECTIONS)), repeated=st.sampled_from(list(_SECTIONS)), at=st.integers(0, 5))
def test_a_repeated_top_level_key_names_the_file_the_key_and_both_lines(tmp_path_factory, order, repeated, at) -> None:
    blocks = [_SECTIONS[k] for k in order]
    blocks.insert(min(at, len(blocks)), _SECTIONS[repeated])
    text = "\n".join(blocks) + "\n"
    lines = [i + 1 for i, line in enumerate(text.splitlines()) if line.split(":")[0] == repeated]
    path = tmp_path_factory.mktemp("dup") / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: key {repeated!r} appears twice (lines {lines[0]} and {lines[1]}); YAML would keep only the last"
    )


def test_a_repeated_nested_key_and_one_in_a_base_file(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("name: b\ndata:\n  manifest: m.json\n  patch_size: [32, 32, 32]\n  patch_size: [16, 16, 16]\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nname: c\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "child.yaml")
    assert str(info.value) == (
        f"{tmp_path / 'child.yaml'}: base: {tmp_path / 'base.yaml'}: key 'patch_size' appears twice "
        "(lines 4 and 5); YAML would keep only the last"
    )


@pytest.mark.parametrize(
    "base_line, expect",
    [
        ("base: missing.yaml", "base: {folder}/missing.yaml: config file does not exist"),
        ("base: [a.yaml]", "base: must be a path to another YAML config, got ['a.yaml']"),
        ("base: broken.yaml", "base: {folder}/broken.yaml: invalid YAML at line 2"),
    ],
)
def test_errors_about_base_name_the_file_that_refers_to_it(tmp_path: Path, base_line: str, expect: str) -> None:
    (tmp_path / "broken.yaml").write_text("data: [1, 2\n")
    child = tmp_path / "sub" / "child.yaml"
    child.parent.mkdir()
    child.write_text(f"{base_line.replace('missing', '../missing').replace('broken', '../broken')}\nname: c\n")
    with pytest.raises(ConfigError) as info:
        load_config(child)
    assert str(info.value).startswith(f"{child}: " + expect.format(folder=tmp_path)), str(info.value)


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["loss.name=mbls", "loss.margin=-1"], "parameter 'margin' must be in [0, inf], got -1.0"),
        (["loss.name=ls", "loss.epsilon=2"], "parameter 'epsilon'"),
        (["model.channels=[8]"], "model: cannot build 'unet'"),
    ],
)
def test_loss_and_model_value_errors_at_training_name_the_config_file(capsys, tmp_path: Path, overrides, named) -> None:
    """Values the registries refuse only when building the loss/model: exit 2, file and key named,
    and no run folder is left behind."""
    args = ["train", "--config", SMOKE_CONFIG, "--run-dir", str(tmp_path / "run"), "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"segcalib: error: {SMOKE_CONFIG}: " in err and named in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("patch", "ok"), [([48, 64, 48], False), ([64, 64, 48], True)])
def test_rotate90_needs_a_square_plane(tmp_path: Path, patch: list[int], ok: bool) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(f"base: {SMOKE_CONFIG}\ndata:\n  patch_size: {patch}\n  augment:\n    rotate90_prob: 0.5\n")
    if ok:  # a quarter turn keeps a 64x64 plane's shape
        assert load_config(path).data.augment.rotate90_prob == 0.5
        return
    with pytest.raises(ConfigError, match=r"data\.augment\.rotate90_prob.*\[64, 48, 48\]"):
        load_config(path)
