"""The committed study documents are what the committed records rebuild, and the advice in
``docs/what_to_use.md`` carries the records' own numbers (mean ± std over seeds, read here from the JSON)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

DOCS = Path(REPO_ROOT) / "docs"
RECORDS = DOCS / "results" / "study"


def _study_module():
    spec = importlib.util.spec_from_file_location("calibration_study_docs", Path(REPO_ROOT) / "pipelines" / "calibration_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, REPO_ROOT)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.skipif(not (RECORDS / "short" / "ce_dice" / "seed0.json").exists(), reason="no study records")


def test_committed_records_rebuild_the_committed_documents(tmp_path: Path) -> None:
    study = _study_module()
    out = {name: tmp_path / name for name in ("results.md", "what_to_use.md", "recipe.yaml")}
    assert study.main(["--tables-only", "--records", str(RECORDS),
                       "--results", str(out["results.md"]), "--what-to-use", str(out["what_to_use.md"]),
                       "--recipe", str(out["recipe.yaml"])]) == 0
    body = lambda text: text.split("## Protocol", 1)[1]  # noqa: E731 (the first paragraph names the date)
    assert body(out["results.md"].read_text()) == body((DOCS / "results.md").read_text())
    assert out["what_to_use.md"].read_text() == (DOCS / "what_to_use.md").read_text()
    assert out["recipe.yaml"].read_text() == (DOCS / "results" / "recipe.yaml").read_text()


def test_what_to_use_states_the_recipes_numbers_and_dice_cost_from_the_records() -> None:
    from segcalib.experiment import read_recipe

    recipe = read_recipe(DOCS / "results" / "recipe.yaml")
    key = "none" if recipe.calibrator == "none" else f"{recipe.calibrator}@{recipe.region}"
    mine = [json.loads(p.read_text())["test"][key]["summary"]
            for p in sorted((RECORDS / recipe.regime / recipe.loss).glob("seed*.json"))]
    ref = [json.loads(p.read_text())["test"]["none"]["summary"]
           for p in sorted((RECORDS / recipe.regime / "ce_dice").glob("seed*.json"))]
    assert len(mine) == len(ref) == 3
    text = (DOCS / "what_to_use.md").read_text()
    for metric in ("ece_foreground", "ece_boundary", "nll"):
        values = [float(s[metric]) for s in mine]
        assert f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}" in text, metric
    cost = [100 * (float(a["dice_fg"]) - float(b["dice_fg"])) for a, b in zip(mine, ref)]
    assert f"{statistics.fmean(cost):+.2f} ± {statistics.stdev(cost):.2f} point paired by seed" in text
    assert f"configs/hippocampus/{recipe.loss}.yaml" in text and f"--method {recipe.calibrator}" in text
