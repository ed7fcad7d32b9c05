"""Checkpoints that load safely but are malformed are a RunError naming the file and the key;
a checkpoint is never started on a disk without room for it, and the earlier one stays intact."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import segcalib.runs.checkpoint as checkpoint_module
from segcalib.errors import ResourceError, RunError
from segcalib.runs.checkpoint import load_checkpoint, rng_state, save_checkpoint
from tests.mounts import fill, small_filesystem


def _valid_payload() -> dict[str, Any]:
    """What the trainer writes, in miniature (a two-parameter network, plain states)."""
    return {
        "model": {"conv.weight": torch.ones(2, 1, 3), "conv.bias": torch.zeros(2)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "scheduler": {"last_epoch": 1},
        "scaler": None,
        "loss": {},
        "epoch": 1,
        "best_score": -1.5,
        "best_epoch": 1,
        "config": {"name": "x", "train": {"epochs": 2}},
        "config_hash": "0123456789abcdef",
        "num_classes": 2,
        "num_channels": 1,
        "class_names": ["background", "organ"],
        "rng": rng_state(),
    }


# What each use needs, stated independently of segcalib's table: key -> is the value usable?
def _int_at_least(low: int):
    return lambda v: type(v) is int and v >= low


_EXPORT_SPEC = {
    "model": lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items()),
    "epoch": _int_at_least(0),
    "num_classes": _int_at_least(1),
    "num_channels": _int_at_least(1),
    "class_names": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "config": lambda v: isinstance(v, dict),
    "config_hash": lambda v: isinstance(v, str),
}
_RESUME_SPEC = {
    **_EXPORT_SPEC,
    "optimizer": lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict) and isinstance(v.get("param_groups"), list),
    "scheduler": lambda v: isinstance(v, dict),
    "scaler": lambda v: v is None or isinstance(v, dict),
    "loss": lambda v: isinstance(v, dict),
    "best_score": lambda v: type(v) in (int, float),
    "best_epoch": _int_at_least(0),
    # the mutations below never write a valid inside: a mutated rng (even {}) lacks its keys
    "rng": lambda v: isinstance(v, dict) and set(rng_state()) <= set(v),
}


def _bad_keys(payload: dict[str, Any], spec: dict) -> set[str]:
    bad = {k for k, ok in spec.items() if k not in payload or not ok(payload[k])}
    if not bad and len(payload["class_names"]) != payload["num_classes"]:
        bad = {"class_names"}
    return bad


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 5),
    st.floats(allow_nan=False, width=32),
    st.text(max_size=5),
    st.lists(st.one_of(st.integers(0, 3), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.sampled_from(["state", "param_groups", "w"]), st.one_of(st.integers(0, 3), st.just({}), st.just([])), max_size=3),
    st.builds(lambda n: torch.zeros(n), st.integers(0, 3)),
    st.dictionaries(st.text(max_size=3), st.builds(lambda n: torch.ones(n), st.integers(0, 2)), max_size=2),
)
_KEYS = sorted(_RESUME_SPEC) + ["extra", "format_version"]
_MUTATIONS = st.dictionaries(st.sampled_from(_KEYS), st.one_of(st.just("delete"), _VALUES), max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=_MUTATIONS)
def test_malformed_payloads_are_refused_naming_the_file_and_a_bad_key(tmp_path: Path, mutations: dict) -> None:
    payload = _valid_payload()
    for key, value in mutations.items():
        if isinstance(value, str) and value == "delete":
            payload.pop(key, None)
        else:
            payload[key] = value
    path = tmp_path / "ck.pt"
    torch.save(payload, path)
    for purpose, spec in (("export", _EXPORT_SPEC), ("resume", _RESUME_SPEC)):
        bad = _bad_keys(payload, spec)
        if not bad:
            assert load_checkpoint(path, purpose=purpose)["epoch"] == payload["epoch"]
            continue
        with pytest.raises(RunError) as info:
            load_checkpoint(path, purpose=purpose)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and f"for {purpose}" in message
        assert any(f"'{key}'" in message or f"'{key}." in message for key in bad), (bad, message)


@pytest.mark.parametrize(
    "payload, purpose, named",
    [
        ({"model": {"w": torch.zeros(1)}}, "export", "key 'epoch' is missing"),
        ({**_valid_payload(), "epoch": "3"}, "export", "key 'epoch' must be an integer >= 0, got str '3'"),
        ({**_valid_payload(), "class_names": ["a"]}, "export", "'class_names' has 1 names but 'num_classes' is 2"),
        ({**_valid_payload(), "optimizer": None}, "resume", "key 'optimizer' must be a mapping, got NoneType None"),
        ({**_valid_payload(), "rng": {**rng_state(), "numpy": {"kind": "MT19937"}}}, "resume", "key 'rng.numpy.keys' is missing"),
        ([1, 2], "export", "not a segcalib checkpoint (a list"),
    ],
)
def test_each_problem_is_named(tmp_path: Path, payload: Any, purpose: str, named: str) -> None:
    path = tmp_path / "ck.pt"
    torch.save(payload, path)
    with pytest.raises(RunError) as info:
        load_checkpoint(path, purpose=purpose)
    assert str(info.value).startswith(f"{path}: ") and named in str(info.value)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=40),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int64, torch.uint8]),
)
def test_size_estimate_is_never_below_the_written_size(tmp_path: Path, monkeypatch, sizes: list[int], dtype) -> None:
    """The free-space check is only as good as its estimate: never below what torch.save writes,
    and not far above it (so that a disk with room is not refused)."""
    needed = []
    real_check = checkpoint_module.check_free_space
    monkeypatch.setattr(checkpoint_module, "check_free_space", lambda path, n: needed.append(n) or real_check(path, n))
    state = {"model": {f"layer{i}": torch.zeros(n, dtype=dtype) for i, n in enumerate(sizes)}, "epoch": 1}
    path = tmp_path / "ck.pt"
    path.unlink(missing_ok=True)  # no previous file: the estimate alone
    save_checkpoint(path, state)
    written = path.stat().st_size
    assert written <= needed[-1] <= written * 1.1 + 128 * 1024


def test_too_little_free_space_is_refused_before_writing(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(1000)}, "epoch": 1})
    before = path.read_bytes()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda p: usage._replace(free=5000))
    with pytest.raises(ResourceError) as info:
        save_checkpoint(path, {"model": {"w": torch.ones(1000)}, "epoch": 2})
    message = str(info.value)
    assert message.startswith(f"{path.parent}: not enough free space to write last.pt: 5,000 bytes free, about ")
    needed = int(message.split("about ")[1].split(" needed")[0].replace(",", ""))
    assert needed >= 4000 + len(before) // 2 and "--resume" in message
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_a_real_full_disk_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    """A 4 MiB tmpfs: the first 1 MiB checkpoint fits; with 0.5 MiB left the next one is refused
    before a byte is written, naming the folder and both byte counts; the first stays loadable."""
    with small_filesystem(tmp_path / "fs", 4 * 1024 * 1024) as fs:
        path = fs / "checkpoints" / "last.pt"
        save_checkpoint(path, {"model": {"w": torch.zeros(256 * 1024)}, "epoch": 1})
        fill(fs, 512 * 1024)
        free = shutil.disk_usage(fs).free
        with pytest.raises(ResourceError) as info:
            save_checkpoint(path, {"model": {"w": torch.ones(256 * 1024)}, "epoch": 2})
        assert f"{path.parent}: not enough free space to write last.pt: {free:,} bytes free" in str(info.value)
        state = torch.load(path, weights_only=True)
        assert state["epoch"] == 1 and float(state["model"]["w"].abs().sum()) == 0.0
        assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
