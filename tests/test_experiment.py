"""train -> export -> evaluate in one call: finished runs are reused only when they match."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import segcalib.experiment as experiment
from segcalib.errors import RunError
from tests.conftest import SMOKE_CONFIG


def test_a_finished_run_is_reused_only_with_the_same_config(smoke_run: Path, tmp_path: Path, monkeypatch) -> None:
    copy = tmp_path / "run"
    shutil.copytree(smoke_run, copy)
    calls = []
    monkeypatch.setattr(experiment, "train", lambda cfg, run, resume, progress: calls.append((cfg.train.epochs, resume)))

    assert experiment.train_or_reuse(SMOKE_CONFIG, copy, ["train.epochs=1"], progress=False) == 1
    assert calls == []  # finished with this very config: reused
    with pytest.raises(RunError, match=r"another config \(changed: loss.name\)"):
        experiment.train_or_reuse(SMOKE_CONFIG, copy, ["train.epochs=1", "loss.name=focal"], progress=False)
    assert experiment.train_or_reuse(SMOKE_CONFIG, copy, ["train.epochs=3"], progress=False) == 3
    assert calls == [(3, True)]  # more epochs asked for: resumed, not restarted
