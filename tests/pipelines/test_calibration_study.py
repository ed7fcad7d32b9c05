"""Study v2 on the smoke cases end to end (a rerun retrains and re-cross-validates nothing and writes
the same tables; no test case ever enters a fold), plus the selection criterion and the seed-noise
rule on hand-made numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, REPO_ROOT)
from pipelines.study.cases import protocol_case_ids  # noqa: E402
from pipelines.study.grid import Job  # noqa: E402
from pipelines.study.selection import NO_REGION, Candidate, paired, score_candidates  # noqa: E402
from segcalib.data import load_manifest  # noqa: E402

SMOKE = Path(REPO_ROOT) / "data_manifests" / "hippocampus_smoke.json"
FULL = Path(REPO_ROOT) / "data_manifests" / "hippocampus_full.json"


def _load_study():
    spec = importlib.util.spec_from_file_location("calibration_study", Path(REPO_ROOT) / "pipelines" / "calibration_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["calibration_study"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    argv = ["--smoke", "--regions", "boundary", "--out", str(root / "runs"), "--results", str(root / "docs" / "results.md"),
            "--hardware", "test machine"]
    study = _load_study()
    assert study.main(argv) == 0
    yield study, argv, root
    sys.modules.pop("calibration_study", None)


def _tables(text: str) -> str:
    """results.md without its first paragraph (the timing of this invocation)."""
    return text.split("\n", 3)[3]


@pytest.mark.slow
def test_rerun_retrains_and_refits_nothing_and_writes_the_same_tables(smoke, monkeypatch) -> None:
    study, argv, root = smoke
    first = (root / "docs" / "results.md").read_text()

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished step was run again")

    monkeypatch.setattr("segcalib.experiment.train", forbidden)
    monkeypatch.setattr("pipelines.study.run.cross_validate", forbidden)
    assert study.main(argv) == 0
    assert _tables((root / "docs" / "results.md").read_text()) == _tables(first)


@pytest.mark.slow
def test_no_test_case_enters_a_fold(smoke) -> None:
    _, _, root = smoke
    manifest = load_manifest(SMOKE)
    test_ids = {c.case_id for c in manifest.cases("test")}
    fit_ids = {c.case_id for split in ("training", "validation") for c in manifest.cases(split)}
    files = sorted((root / "runs").glob("*/*/seed*/study/nontest_*/cv_*.json"))
    assert len(files) == 4  # 2 losses x 2 seeds x 1 region
    for path in files:
        folds = json.loads(path.read_text())["folds"]
        assert set(folds) == fit_ids and not set(folds) & test_ids
        assert sorted(set(folds.values())) == [0, 1]
    calibrators = sorted((root / "runs").glob("*/*/seed*/study/nontest_*/calibrators/*/*/calibrator.json"))
    assert len(calibrators) == 8  # 4 runs x 2 calibrators x 1 region, each refitted on the non-test cases
    for path in calibrators:
        assert set(json.loads(path.read_text())["cases"]) == fit_ids


@pytest.mark.slow
def test_tables_are_means_over_seeds_of_the_reports(smoke) -> None:
    _, _, root = smoke
    text = (root / "docs" / "results.md").read_text()
    nll = [json.loads((root / "runs" / "short" / "ce" / f"seed{s}" / "reports" / "test_T1" / "report.json").read_text())
           ["summary"]["nll"] for s in (0, 1)]
    row = next(line for line in text.split("### Test, raw networks")[1].splitlines() if line.startswith("| ce |"))
    assert row.split("|")[8].strip() == f"{statistics.fmean(nll):.4f} ± {statistics.stdev(nll):.4f}"
    order = ["## Protocol", "## Recommended recipe", "## Short regime", "### Cross-validated selection log",
             "## The seed papers' claims"]
    assert [text.index(h) for h in order] == sorted(text.index(h) for h in order)
    assert "ensemble of the recipe's 2 seeds" in text
    assert "(results.md)" in (root / "docs" / "what_to_use.md").read_text()


def test_protocols_never_hold_a_test_case() -> None:
    manifest = load_manifest(FULL)
    test_ids = {c.case_id for c in manifest.cases("test")}
    validation = protocol_case_ids(manifest, "validation")
    nontest = protocol_case_ids(manifest, "nontest")
    assert (len(validation), len(nontest), len(test_ids)) == (16, 100, 20)
    assert not (set(validation) | set(nontest)) & test_ids and set(validation) < set(nontest)


def _row(nll, ece_all, ece_fg, ece_b, dice_change=0.0):
    row = {m: {"mean": v} for m, v in zip(("nll", "ece_all", "ece_foreground", "ece_boundary"), (nll, ece_all, ece_fg, ece_b))}
    return {**row, "dice_change": dice_change}


def test_criterion_averages_normalised_metrics_and_refuses_trading_regions() -> None:
    raw_base = _row(0.06, 0.01, 0.10, 0.09)
    results = {}
    for seed, scale in ((0, 1.0), (1, 2.0)):
        base = {m: {"mean": v["mean"] * scale} for m, v in raw_base.items() if m != "dice_change"}
        results[Job("short", "ce_dice", seed)] = {
            "validation": {"dice_fg": 0.85}, "cv": {"all": {"uncalibrated": base, "table": {
                # halves every metric: score 0.5, admissible
                "temperature": _row(*(0.5 * base[m]["mean"] for m in ("nll", "ece_all", "ece_foreground", "ece_boundary"))),
                # foreground 10x better but all-voxel ECE 4x worse: mean ratio 0.9 < 1, yet refused
                "vector": _row(base["nll"]["mean"] * 0.6, base["ece_all"]["mean"] * 3.0,
                               base["ece_foreground"]["mean"] * 0.01, base["ece_boundary"]["mean"] * 0.01),
                # halves everything but costs 0.5 point of Dice: refused
                "dirichlet": _row(*(0.5 * base[m]["mean"] for m in ("nll", "ece_all", "ece_foreground", "ece_boundary")),
                                  dice_change=-0.005),
            }}}}
    scored = {s.candidate: s for s in score_candidates(results, "short", dice_tolerance=0.003)}
    temperature = scored[Candidate("short", "ce_dice", "temperature", "all")]
    vector = scored[Candidate("short", "ce_dice", "vector", "all")]
    dirichlet = scored[Candidate("short", "ce_dice", "dirichlet", "all")]
    none = scored[Candidate("short", "ce_dice", "none", NO_REGION)]
    assert math.isclose(temperature.score, 0.5) and temperature.admissible
    assert math.isclose(vector.score, (0.6 + 3.0 + 0.01 + 0.01) / 4) and not vector.admissible
    assert "ece_all" in vector.reason
    assert not dirichlet.admissible and "Dice -0.50 pt" in dirichlet.reason
    assert math.isclose(none.score, 1.0) and none.admissible
    best_first = score_candidates(results, "short")
    assert best_first[0].candidate == temperature.candidate


def test_seed_noise_rule() -> None:
    same_sign = paired({0: 1.0, 1: 1.1, 2: 1.2}, {0: 0.0, 1: 0.0, 2: 0.0})  # d = 1.0, 1.1, 1.2: sd 0.1
    assert math.isclose(same_sign.mean, 1.1) and math.isclose(same_sign.std, 0.1) and same_sign.beyond_noise
    mixed = paired({0: 1.0, 1: -0.1, 2: 1.0}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert not mixed.beyond_noise
    wide = paired({0: 0.1, 1: 1.0, 2: 2.0}, {0: 0.0, 1: 0.0, 2: 0.0})  # mean 1.03 < 2 sd (1.90)
    assert not wide.beyond_noise
    assert not paired({0: 1.0}, {0: 0.0}).beyond_noise  # one seed decides nothing
