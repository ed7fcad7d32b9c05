"""The study pipeline end to end on the smoke cases: tables, figure, recipe last; a rerun retrains nothing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("calibration_study", Path(REPO_ROOT) / "pipelines" / "calibration_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["calibration_study"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("calibration_study", None)


def test_study_writes_results_and_reuses_finished_runs(study, tmp_path: Path, monkeypatch) -> None:
    smoke = Path(REPO_ROOT) / "data_manifests" / "hippocampus_smoke.json"
    argv = [
        "--regimes", "short", "--losses", "ce", "ce_dice", "--epochs", "1",
        "--set", f"data.manifest={smoke}", "--set", "model.channels=[4,8,16,32]", "--set", "model.num_res_units=0",
        "--out", str(tmp_path / "study"), "--results", str(tmp_path / "docs" / "results.md"),
        "--conclusions", str(tmp_path / "none.md"), "--hardware", "test machine",
    ]
    assert study.main(argv) == 0
    text = (tmp_path / "docs" / "results.md").read_text()
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ce")]
    assert {"ce", "ce_dice"} <= set(rows)
    assert text.index("## Recommended recipe") > text.index("## Recipe selection") > text.index("## What was run")
    assert "segcalib train --config configs/hippocampus/" in text.split("## Recommended recipe")[1]
    assert (tmp_path / "docs" / "figures" / "reliability_short_foreground.png").stat().st_size > 1000
    tables = text.split("## What was run")[0].split("\n", 3)[3]  # without the header line (timing)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("segcalib.experiment.train", no_training)
    assert study.main(argv) == 0
    again = (tmp_path / "docs" / "results.md").read_text()
    assert again.split("## What was run")[0].split("\n", 3)[3] == tables
