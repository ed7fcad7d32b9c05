"""Atomic writes: complete files or none; out of space is a clear error and keeps earlier files."""

from __future__ import annotations

import errno
import io
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
    import segcalib.runs.checkpoint as checkpoint_module
    from segcalib.runs.checkpoint import load_checkpoint

    class FullDisk(io.FileIO):
        def write(self, data) -> int:
            super().write(bytes(data)[:100])  # part of it lands, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

    calls = {"n": 0}

    def open_checkpoint(path, mode="r", *args, **kwargs):
        calls["n"] += 1  # the real torch.save writes through this file
        if calls["n"] > 2:  # best.pt and last.pt of epoch 1 succeed, then the disk is full
            return FullDisk(path, mode)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "open", open_checkpoint, raising=False)
    run = tmp_path / "run"
    code = main(["train", "--config", SMOKE_CONFIG, "--run-dir", str(run), "--no-progress", "--set", "train.iterations_per_epoch=2"])
    err = capsys.readouterr().err
    assert code == 2 and "no space left" in err and "Traceback" not in err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert not list((run / "checkpoints").glob("*.tmp*"))


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    """mkstemp makes 0600 files; results must be readable like any file the user creates."""
    umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
