"""Atomic writes: complete files or none; out of space is a clear error and keeps earlier files."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from segcalib.cli import main
from segcalib.errors import ResourceError
from segcalib.utils.files import atomic_path, write_text_atomic
from tests.conftest import SMOKE_CONFIG


def test_replaces_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    write_text_atomic(target, "new")
    assert target.read_text() == "new"


def test_keeps_the_suffix_that_writers_look_at(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "x.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        tmp.write_bytes(b"1")


def test_out_of_space_is_a_resource_error(tmp_path: Path, monkeypatch) -> None:
    write_text_atomic(tmp_path / "a.txt", "kept")

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(ResourceError, match="no space left"):
        write_text_atomic(tmp_path / "a.txt", "new")
    assert (tmp_path / "a.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_training_out_of_space_exits_2_and_keeps_the_last_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    import torch

    from segcalib.training.checkpoint import load_checkpoint

    real_save = torch.save
    calls = {"n": 0}

    def save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # best.pt and last.pt of epoch 1 succeed, then the disk is full
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    code = main(["train", "--config", SMOKE_CONFIG, "--run-dir", str(run), "--no-progress", "--set", "train.iterations_per_epoch=2"])
    err = capsys.readouterr().err
    assert code == 2 and "no space left" in err and "Traceback" not in err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert not list((run / "checkpoints").glob("*.tmp*"))
