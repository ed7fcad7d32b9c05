"""Study v3 on the smoke cases end to end (a unit with a record is never redone and the tables are rebuilt
from the records alone; no test case ever enters a fold; a record's numbers are those of
``segcalib evaluate`` on written maps), the priority order and the budget, plus the selection
criterion and the seed-noise rule on hand-made numbers."""

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
def test_rerun_redoes_no_unit_and_tables_only_writes_the_same_tables(smoke, monkeypatch, tmp_path) -> None:
    study, argv, root = smoke
    first = (root / "docs" / "results.md").read_text()

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished unit was run again")

    monkeypatch.setattr("pipelines.study.unit.train_or_reuse", forbidden)
    monkeypatch.setattr("pipelines.study.run.cross_validate", forbidden)
    assert study.main(argv) == 0
    assert _tables((root / "docs" / "results.md").read_text()) == _tables(first)
    # the records alone (heavy outputs gone) rebuild the same tables
    records = root / "runs" / "records"
    elsewhere = tmp_path / "records"
    import shutil

    shutil.copytree(records, elsewhere)
    out = tmp_path / "results.md"
    assert study.main(["--smoke", "--regions", "boundary", "--tables-only", "--records", str(elsewhere),
                       "--out", str(tmp_path / "no_runs"), "--results", str(out)]) == 0
    # same tables; only the paragraphs naming the folders differ
    assert out.read_text().split("## Recommended recipe")[1] == first.split("## Recommended recipe")[1]


@pytest.mark.slow
def test_a_killed_unit_is_redone_and_the_budget_stops_before_a_unit_that_does_not_fit(smoke) -> None:
    study, argv, root = smoke
    records = root / "runs" / "records"
    victim = records / "short" / "ce" / "seed1.json"
    kept = {p: p.stat().st_mtime_ns for p in records.glob("*/*/seed*.json") if p != victim}
    saved = victim.read_text()
    victim.unlink()  # as if the unit had been killed before writing its record
    assert study.main([*argv, "--budget-min", "0"]) == 0  # a unit takes > 0 min: nothing starts
    assert not victim.exists()
    assert study.main(argv) == 0
    assert victim.exists() and {p: p.stat().st_mtime_ns for p in kept} == kept
    assert json.loads(victim.read_text())["test"] == json.loads(saved)["test"]  # same steps, reused


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
def test_record_numbers_are_those_of_evaluate_on_written_maps(smoke, tmp_path) -> None:
    from segcalib.export.posthoc import apply_to_predictions
    from segcalib.reports import evaluate

    _, _, root = smoke
    run = root / "runs" / "short" / "ce" / "seed0"
    record = json.loads((root / "runs" / "records" / "short" / "ce" / "seed0.json").read_text())
    keys = ("dice_fg", "hd95", "ece_all", "ece_foreground", "ece_boundary", "media_foreground_ece", "nll", "brier")
    raw = evaluate(run / "exports" / "test", SMOKE, tmp_path / "none", split="test", write_html=False)["summary"]
    assert [float(record["test"]["none"]["summary"][k]) for k in keys] == pytest.approx([raw[k] for k in keys], rel=1e-6)
    calibrator = next(run.glob("study/nontest_*/calibrators/boundary/vector"))
    apply_to_predictions(calibrator, run / "exports" / "test", tmp_path / "vector", progress=False)
    cal = evaluate(tmp_path / "vector", SMOKE, tmp_path / "vector_report", split="test", write_html=False)["summary"]
    mine = [float(record["test"]["vector@boundary"]["summary"][k]) for k in keys]  # the record writes inf as "inf"
    assert mine == pytest.approx([cal[k] for k in keys], rel=1e-6)


@pytest.mark.slow
def test_tables_are_means_over_seeds_of_the_records(smoke) -> None:
    _, _, root = smoke
    text = (root / "docs" / "results.md").read_text()
    nll = [json.loads((root / "runs" / "records" / "short" / "ce" / f"seed{s}.json").read_text())
           ["test"]["none"]["summary"]["nll"] for s in (0, 1)]
    row = next(line for line in text.split("### Test, raw networks")[1].splitlines() if line.startswith("| ce |"))
    assert row.split("|")[8].strip() == f"{statistics.fmean(nll):.4f} ± {statistics.stdev(nll):.4f}"
    order = ["## Protocol", "## Recommended recipe", "## Short regime", "### Cross-validated selection log",
             "## The papers' claims"]
    assert [text.index(h) for h in order] == sorted(text.index(h) for h in order)
    assert "(results.md)" in (root / "docs" / "what_to_use.md").read_text()
    from segcalib.experiment import read_recipe

    recipe = read_recipe(root / "docs" / "recipe.yaml")  # what `segcalib demo` trains and calibrates with
    headline = text.split("## Recommended recipe")[1].split("**")[1]
    fitted = "" if recipe.calibrator == "none" else f" fitted on {recipe.region} voxels"
    assert headline == f"{recipe.loss}, {recipe.regime} regime, {recipe.calibrator}{fitted}"
    assert f"criterion {recipe.score:.3f}" in text and recipe.records == 4 and recipe.complete is False
    # what_to_use.md: the recipe's numbers as mean ± std over the seeds' records, and its Dice cost
    key = "none" if recipe.calibrator == "none" else f"{recipe.calibrator}@{recipe.region}"
    seeds = [json.loads((root / "runs" / "records" / recipe.regime / loss / f"seed{s}.json").read_text())
             for loss in (recipe.loss, "ce_dice") for s in (0, 1)]
    fg = [float(r["test"][key]["summary"]["ece_foreground"]) for r in seeds[:2]]
    dice = [float(r["test"][key if i < 2 else "none"]["summary"]["dice_fg"]) for i, r in enumerate(seeds)]
    advice = (root / "docs" / "what_to_use.md").read_text()
    assert f"foreground ECE {statistics.fmean(fg):.4f} ± {statistics.stdev(fg):.4f}" in advice
    cost = [100 * (dice[i] - dice[i + 2]) for i in (0, 1)]
    assert f"{statistics.fmean(cost):+.2f} ± {statistics.stdev(cost):.2f} point paired by seed" in advice


def test_priority_order_and_the_long_regime_waits_for_the_whole_short_regime() -> None:
    """The short regime in the issue's order, then the long regime: CE+Dice's units once every short
    unit is recorded or running, the top three's once every short unit is recorded."""
    import argparse

    from pipelines.study.budget import pending_units
    from pipelines.study.grid import SEED_PAPER_LOSSES, priority_order

    order = priority_order([0, 1, 2])
    assert [j.folder for j in order[:4]] == ["short/ce_dice/seed0", "short/ce_dice/seed1", "short/ce_dice/seed2",
                                             "short/ce/seed0"]
    assert [j.loss for j in order[3:11]] == list(SEED_PAPER_LOSSES) and order[11] == Job("short", "ce", 1)
    assert {j.loss for j in order[27:]} == {"ecp", "dice", "focal_adaptive", "logit_l1", "cals_heuristic", "hardl1ace_dice",
                                            "softl1ace_dice", "crac"}
    args = argparse.Namespace(seeds=[0, 1, 2], losses=list(dict.fromkeys(j.loss for j in order)),
                              regimes=["short", "long"], long_losses=["ce_dice", "mbls"], dice_tolerance=0.003)
    assert all(j.regime == "short" for j in pending_units(args, {}))
    done = {j: {} for j in order[:27]}  # every must-have short unit has a record
    assert all(j.regime == "short" for j in pending_units(args, done))  # the other losses come first
    done = {j: {} for j in order[:-1]}  # the last short unit is still to run
    assert pending_units(args, done) == [order[-1]]
    # ... or running (--jobs): CE+Dice's long units may start (CE+Dice is in the long regime whatever
    # the short one shows); the top three wait for the last record
    baseline_long = [Job("long", "ce_dice", s) for s in (0, 1, 2)]
    unnamed = argparse.Namespace(**{**vars(args), "long_losses": None})  # the top three: read from the records
    assert pending_units(unnamed, done, running={order[-1]}) == [order[-1], *baseline_long]
    # losses named by --long-losses do not wait for the top three: all of them, and only they
    named = [Job("long", l, s) for s in (0, 1, 2) for l in ("ce_dice", "mbls")]
    assert pending_units(args, done, running={order[-1]}) == [order[-1], *named]
    only_mbls = argparse.Namespace(**{**vars(args), "long_losses": ["mbls"]})
    assert pending_units(only_mbls, done, running={order[-1]}) == [order[-1], *[Job("long", "mbls", s) for s in (0, 1, 2)]]
    assert all(j.regime == "short" for j in pending_units(args, {j: {} for j in order[:-2]}, running={order[-1]}))
    pending = pending_units(args, {j: {} for j in order})
    assert pending == [Job("long", l, s) for s in (0, 1, 2) for l in ("ce_dice", "mbls")]
    must_have_only = argparse.Namespace(**{**vars(args), "losses": ["ce_dice", "mbls"]})
    assert pending_units(must_have_only, {j: {} for j in order[:27]})[-6:] == pending


def test_the_must_have_grid_is_complete_only_with_the_long_regime_of_the_top_three(monkeypatch) -> None:
    from pipelines.study import budget
    from pipelines.study.grid import must_have_short

    monkeypatch.setattr(budget, "top_losses", lambda records, n, tol: ["mbls", "cals", "svls"][:n])
    short = {j: {} for j in must_have_short([0, 1, 2])}
    assert len(short) == 27 and not budget.must_have_complete({}, [0, 1, 2], 0.003)
    long = {Job("long", l, s): {} for l in ("ce_dice", "mbls", "cals", "svls") for s in (0, 1, 2)}
    assert not budget.must_have_complete(short, [0, 1, 2], 0.003)
    assert budget.must_have_complete({**short, **long}, [0, 1, 2], 0.003)
    assert not budget.must_have_complete({**long, **dict(list(short.items())[1:])}, [0, 1, 2], 0.003)
    assert not budget.must_have_complete({**short, **dict(list(long.items())[:-1])}, [0, 1, 2], 0.003)


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


@pytest.mark.slow
def test_parallel_units_start_as_soon_as_a_worker_is_free_and_log_like_the_parent(tmp_path) -> None:
    """With ``--jobs 2`` the units run in spawned processes: a third unit starts when the first
    ends, not when the slow second one does, and the units' log lines (training progress) reach
    the parent's stream, each naming its worker."""
    import subprocess

    script = (
        "import logging, sys\n"
        "from pipelines.study.run import UnitPool\n"
        "from tests.pipelines.study_worker import say\n"
        "logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')\n"
        "ended = []\n"
        "with UnitPool(say, 2) as pool:\n"
        "    pool.start('a', ('a', 0.2, sys.argv[1]))\n"
        "    pool.start('b', ('b', 6.0, sys.argv[1]))\n"
        "    ended += pool.wait_any()\n"
        "    pool.start('c', ('c', 0.2, sys.argv[1]))\n"
        "    while pool.running:\n"
        "        ended += pool.wait_any()\n"
        "print(ended)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=180, check=True)  # fmt: skip
    assert done.stdout.strip() == "['a', 'c', 'b']"
    times = {p.name: float(p.read_text()) for p in [*tmp_path.glob("*.start"), *tmp_path.glob("*.end")]}
    assert times["c.start"] < times["b.end"]  # c did not wait for the slow unit
    lines = [line for line in done.stderr.splitlines() if "unit says" in line]
    assert sorted(line.split("unit says ")[1] for line in lines) == ["a", "b", "c"]
    assert all("[SpawnProcess-" in line for line in lines)


def test_one_job_runs_each_unit_here_one_at_a_time(tmp_path) -> None:
    from pipelines.study.run import UnitPool
    from tests.pipelines.study_worker import say

    with UnitPool(say, 1) as pool:
        assert pool.free == 1
        pool.start("a", ("a", 0.0, str(tmp_path)))
        assert pool.free == 0 and (tmp_path / "a.end").exists()  # ran here, reported by wait_any
        assert pool.wait_any() == ["a"] and pool.free == 1 and pool.running == []


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie waiting to be reaped has ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads process states from /proc")
def test_a_killed_study_leaves_no_unit_running(tmp_path) -> None:
    """Killing the study (even with SIGKILL, which it cannot catch) ends its workers within seconds:
    a unit left training would be trained a second time, into the same folder, by the next study."""
    import signal
    import subprocess
    import time

    script = (
        "import sys\n"
        "from pipelines.study.run import UnitPool\n"
        "from tests.pipelines.study_worker import say\n"
        "with UnitPool(say, 2) as pool:\n"
        "    pool.start('z', ('z', 120.0, sys.argv[1]))\n"
        "    pool.wait_any()\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO_ROOT)
    try:
        pid_file = tmp_path / "z.pid"
        deadline = time.time() + 120
        while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
            time.sleep(0.2)
        worker = int(pid_file.read_text())
        assert _alive(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.time() + 20
        while _alive(worker) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(worker)
        assert not (tmp_path / "z.end").exists()
    finally:
        parent.kill()


def test_the_recipe_is_never_a_candidate_with_fewer_seeds_than_the_others() -> None:
    """While the grid fills, a loss with one seed (a lucky one) does not lead the recipe; once its
    seeds are in, the criterion alone decides."""
    from pipelines.study.selection import Scored, recommend

    def scored(loss: str, score: float, seeds: int, admissible: bool = True) -> Scored:
        per_seed = {s: {} for s in range(seeds)}
        return Scored(Candidate("short", loss, "temperature", "all"), score, 0.0, {}, 0.86, 0.86, admissible, "", per_seed)

    lucky, baseline, worse = scored("cals_heuristic", 0.24, 1), scored("ce_dice", 0.26, 3), scored("ce", 0.1, 3, False)
    assert recommend({"short": [lucky, baseline, worse]}) is baseline
    complete = scored("cals_heuristic", 0.24, 3)
    assert recommend({"short": [complete, baseline, worse]}) is complete
    assert recommend({"short": [worse]}) is worse  # nothing admissible: the best, flagged by its field


def test_a_resumed_unit_counts_every_epoch_of_its_training() -> None:
    """``seconds`` times the last invocation only; a unit's time adds the epochs of ``metrics.csv``."""
    from pipelines.study.unit import unit_seconds

    resumed = {"seconds": {"train": 274.6, "export": 5.2, "cross_validation": 42.8, "scoring": 14.5, "total": 337.1},
               "training": {"epochs": 60, "seconds": 776.8}}
    assert unit_seconds(resumed) == pytest.approx(776.8 + 5.2 + 42.8 + 14.5)
    assert unit_seconds({"seconds": {"train": 10.0, "total": 12.0}}) == pytest.approx(12.0)  # no metrics.csv


class _InstantPool:
    """A stand-in for ``UnitPool`` that runs nothing: each wait ends the oldest running unit, ten
    minutes later on ``clock``, and gives it a record in ``records``."""

    def __init__(self, clock: list[float], records: dict) -> None:
        self.clock, self.records, self.jobs, self.running, self.started = clock, records, 0, [], []

    def __call__(self, fn, jobs: int) -> "_InstantPool":
        self.jobs = jobs
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    @property
    def free(self) -> int:
        return self.jobs - len(self.running)

    def start(self, job, task) -> None:
        self.running.append(job)
        self.started.append((self.clock[0], job))

    def wait_any(self) -> list:
        self.clock[0] += 600.0
        ended = [self.running.pop(0)] if self.running else []
        self.records.update({job: {} for job in ended})
        return ended


def _budget_with_instant_pool(monkeypatch, **settings):
    """``run_budget`` on an :class:`_InstantPool` (units of ten minutes); the pool and the finished units."""
    import argparse

    from pipelines.study import budget

    clock, records = [0.0], dict(settings.pop("records", {}))
    pool = _InstantPool(clock, records)
    monkeypatch.setattr(budget, "UnitPool", pool)
    monkeypatch.setattr(budget.time, "time", lambda: clock[0])
    monkeypatch.setattr(budget, "load_records", lambda path: dict(records))
    monkeypatch.setattr(budget, "expected_seconds", lambda records, device: 600.0)
    args = argparse.Namespace(**{"seeds": [0, 1, 2], "losses": ["ce_dice", "ce"], "regimes": ["short"], "long_losses": None,
                                 "dice_tolerance": 0.003, "budget_min": None, "jobs": 2, "records": None, "device": "cpu",
                                 "hardware": "x", **settings})
    return pool, budget.run_budget(args, None, None)


def test_the_budget_says_once_that_it_starts_no_more_units(monkeypatch, caplog) -> None:
    """Two units run, the budget is used while they do: the grid says once that it starts no more
    (not again each time a running unit ends) and returns both finished units."""
    with caplog.at_level("INFO", logger="segcalib.study"):
        _, finished = _budget_with_instant_pool(monkeypatch, budget_min=15)
    assert [j.folder for j in finished] == ["short/ce_dice/seed0", "short/ce_dice/seed1"]
    said = [r.getMessage() for r in caplog.records if "not starting" in r.getMessage()]
    assert said == ["budget: 10.0 of 15.0 min used, a unit takes about 10.0 min: not starting short/ce_dice/seed2"]


def test_a_free_worker_starts_the_long_baseline_beside_the_last_short_unit(monkeypatch) -> None:
    """One short unit left and two workers: the second worker starts CE+Dice's long unit at once
    (the queue is read again after each start), not after the short unit ends."""
    from pipelines.study import budget

    monkeypatch.setattr(budget, "top_losses", lambda records, n, tol: [])  # the records here are empty
    pool, finished = _budget_with_instant_pool(monkeypatch, seeds=[0], losses=["ce_dice"], regimes=["short", "long"])
    assert [(t, j.folder) for t, j in pool.started][:2] == [(0.0, "short/ce_dice/seed0"), (0.0, "long/ce_dice/seed0")]
    assert {j.folder for j in finished} == {"short/ce_dice/seed0", "long/ce_dice/seed0"}
