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


def _recipe_file(tmp_path: Path, **values) -> Path:
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_a_recipe_is_checked_against_the_registries(tmp_path: Path) -> None:
    from segcalib.errors import ConfigError

    recipe = experiment.read_recipe(_recipe_file(tmp_path, loss="mbls_dice", calibrator="boundary_temperature"))
    assert (recipe.loss, recipe.calibrator, recipe.region, recipe.complete) == ("mbls_dice", "boundary_temperature", "all", False)
    assert experiment.read_recipe(_recipe_file(tmp_path, **{**recipe.__dict__, "records": 39, "complete": True})).records == 39
    (tmp_path / "written.yaml").write_text(recipe.to_yaml())
    assert experiment.read_recipe(tmp_path / "written.yaml") == recipe  # the study's writer and the demo's reader agree
    for values, message in [({"loss": "mlbs", "calibrator": "temperature"}, r"loss: 'mlbs' is not one of"),
                            ({"loss": "ce", "calibrator": "platt"}, r"calibrator: 'platt' is not one of"),
                            ({"loss": "ce", "calibrator": "temperature", "region": "edge"}, r"region: 'edge'"),
                            ({"loss": "ce"}, r"calibrator: missing"),
                            ({"loss": "ce", "calibrator": "temperature", "seed": 1}, r"unknown key\(s\) \['seed'\]"),
                            ({"loss": "ce", "calibrator": "temperature", "complete": "yes"}, r"complete: 'yes' should be of type bool"),
                            ({"loss": "ce", "calibrator": "temperature", "records": True}, r"records: True should be of type int")]:
        with pytest.raises(ConfigError, match=rf"recipe\.yaml: {message}"):
            experiment.read_recipe(_recipe_file(tmp_path, **values))


@pytest.mark.slow
def test_the_demo_trains_each_loss_calibrates_it_with_the_recipe_and_compares_all(tmp_path: Path) -> None:
    import json

    from segcalib.cli import main

    recipe = _recipe_file(tmp_path, loss="focal", calibrator="temperature", region="foreground")
    root = tmp_path / "demo"
    assert main(["demo", "--config", SMOKE_CONFIG, "--run-dir", str(root), "--recipe", str(recipe),
                 "--losses", "ce", "focal", "--set", "train.epochs=1"]) == 0
    for loss in ("ce", "focal"):
        assert f"name: {loss}" in (root / loss / "config.yaml").read_text()  # trained with its own loss
        fitted = json.loads((root / loss / "calibrators" / "temperature_foreground" / "calibrator.json").read_text())
        assert fitted["method"] == "temperature" and fitted["fit_region"] == "foreground"
    rows = json.loads((root / "comparison.json").read_text())["reports"]
    assert len(rows) == 4  # each loss at T = 1 and with the recipe's calibrator, in one comparison
    reports = sorted((root).glob("*/reports/test_*/report.json"))
    assert sorted(r["nll"] for r in rows) == pytest.approx(sorted(experiment.read_report(p)["summary"]["nll"] for p in reports))
    assert {p.parent.name for p in reports} == {"test_T1", "test_cal_temperature_foreground"}
