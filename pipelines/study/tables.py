"""``docs/results.md`` and ``docs/what_to_use.md`` from the study's numbers (mean ± std over seeds)."""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from segcalib.config import load_config
from segcalib.experiment import Recipe
from segcalib.spatial.regions import ALL
from segcalib.reports.markdown import markdown_table
from segcalib.utils.files import write_text_atomic

from pipelines.study.claims import CLAIMS, check, test_scores
from pipelines.study.grid import BASELINE, CONFIGS, NONE, REPO, Job
from pipelines.study.selection import (
    METRICS, Candidate, Scored, best, paired, recommend, results_from_records, score_candidates,
)
from pipelines.study.unit import candidate_key, unit_seconds

COLUMNS = (
    ("dice_fg", "Dice fg", 4), ("hd95", "HD95 (mm)", 3), ("ece_all", "ECE all", 4),
    ("ece_foreground", "ECE fg", 4), ("ece_boundary", "ECE boundary", 4),
    ("media_foreground_ece", "per-volume ECE fg", 4), ("nll", "NLL", 4), ("brier", "Brier", 4),
)
SCHEDULES = {"none": "constant", "cosine": "cosine", "None": "unrecorded"}  # train.scheduler as shown
TOP = 15  # candidates shown before the full selection log
TARGETS = (  # (metric, bound as a multiple of CE+Dice's value or an absolute bound, text)
    ("ece_foreground", "ratio", 0.2, "pooled foreground ECE ≤ ⅕ of CE+Dice's"),
    ("ece_boundary", "ratio", 1 / 3, "boundary ECE ≤ ⅓ of CE+Dice's"),
    ("nll", "ratio", 0.7, "NLL ≤ 0.7× CE+Dice's"),
    ("ece_all", "ratio", 1.0, "all-voxel ECE no worse than CE+Dice's"),
    ("dice_fg", "dice", 0.003, "mean foreground Dice within 0.3 point of CE+Dice's"),
    ("media_foreground_ece", "absolute", 0.03, "per-volume foreground ECE ≤ 0.03"),
)


@dataclass
class StudyResults:
    results: dict[Job, dict[str, Any]]
    scored: dict[str, list[Scored]]
    chosen: dict[tuple[str, str], Scored]
    calibrated: dict[tuple[Job, str, str], dict[str, Any]]
    recipe: Scored | None
    ensemble: dict[str, Any] | None
    args: argparse.Namespace
    seconds: float
    test_cases: int
    records: dict[Job, dict[str, Any]]

    def seeds_of(self, regime: str, loss: str) -> list[Job]:
        return sorted(j for j in self.results if (j.regime, j.loss) == (regime, loss))

    def raw(self, regime: str, loss: str) -> dict[int, dict[str, Any]]:
        return {j.seed: self.results[j]["test"] for j in self.seeds_of(regime, loss)}

    def with_calibrator(self, regime: str, loss: str) -> dict[int, dict[str, Any]]:
        pick = self.chosen.get((regime, loss))
        if pick is None:
            return {}
        c = pick.candidate
        if c.calibrator == NONE:
            return self.raw(regime, loss)
        return {j.seed: self.calibrated[(j, c.calibrator, c.region)] for j in self.seeds_of(regime, loss)
                if (j, c.calibrator, c.region) in self.calibrated}


def fmt(values: Sequence[float], digits: int) -> str:
    """``mean ± std`` over seeds (``–`` when undefined, ``inf`` for a missed structure)."""
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not kept:
        return "–"
    mean = statistics.fmean(kept)
    if not math.isfinite(mean):
        return "inf"
    return f"{mean:.{digits}f}" + (f" ± {statistics.stdev(kept):.{digits}f}" if len(kept) > 1 else "")


def summary_table(rows: Mapping[str, Mapping[int, dict[str, Any]]], first: str) -> list[str]:
    body = [[label] + [fmt([s.get(k) for s in per_seed.values()], d) for k, _, d in COLUMNS]
            for label, per_seed in rows.items() if per_seed]
    return markdown_table([first] + [t for _, t, _ in COLUMNS], body)


def cv_log(scored: Sequence[Scored]) -> list[str]:
    """Every candidate of a regime, best first: the criterion and why it was (in)admissible."""
    body = [[s.candidate.loss, s.candidate.calibrator, s.candidate.region,
             f"{s.score:.3f} ± {s.score_std:.3f}", *(f"{s.ratios[m]:.2f}" for m in METRICS),
             f"{s.dice:.4f}", "yes" if s.admissible else f"no ({s.reason})"] for s in scored]
    return markdown_table(["loss", "calibrator", "fit region", "score", "NLL ×", "ECE all ×", "ECE fg ×",
                           "ECE boundary ×", "Dice fg (val)", "admissible"], body)


def paired_table(a: Mapping[int, dict[str, Any]], b: Mapping[int, dict[str, Any]]) -> list[str]:
    body = []
    for key, title, digits in COLUMNS:
        d = paired({s: float(v[key]) for s, v in a.items()}, {s: float(v[key]) for s, v in b.items()})
        spread = "–" if math.isnan(d.std) else f"{d.std:.{digits}f}"
        body.append([title, f"{d.mean:+.{digits}f}", spread, str(d.n), "yes" if d.beyond_noise else "no"])
    return markdown_table(["metric", "recipe − CE+Dice (mean)", "std", "seeds", "beyond seed noise"], body)


def targets(a: Mapping[int, dict[str, Any]], b: Mapping[int, dict[str, Any]]) -> list[str]:
    lines = []
    for key, kind, bound, text in TARGETS:
        mine = statistics.fmean(float(v[key]) for v in a.values())
        ref = statistics.fmean(float(v[key]) for v in b.values())
        if kind == "ratio":
            ok, shown = mine <= bound * ref, f"{mine:.4f} vs {ref:.4f} (×{mine / ref:.2f})"
        elif kind == "dice":
            ok, shown = mine >= ref - bound, f"{mine:.4f} vs {ref:.4f} ({100 * (mine - ref):+.2f} pt)"
        else:
            ok, shown = mine <= bound, f"{mine:.4f}"
        lines.append(f"- {'met' if ok else '**not met**'}: {text}: {shown}")
    return lines


def schedules(study: StudyResults) -> str:
    """Each regime's epochs and learning-rate schedule, as its records ran them."""
    shown = []
    for regime in study.args.regimes:
        ran = [r["settings"]["recipe"] for j, r in sorted(study.records.items()) if j.regime == regime]
        if ran:
            epochs = sorted({int(r["epochs"]) for r in ran})
            schedule = sorted({SCHEDULES.get(str(r.get("scheduler")), str(r.get("scheduler"))) for r in ran})
            shown.append(f"{regime} {'/'.join(map(str, epochs))} ({'/'.join(schedule)} learning rate)")
    return ", ".join(shown)


def rerun_lines(args: argparse.Namespace) -> list[str]:
    """How the grid is run and this file rebuilt (resumable: a unit with a record is never redone)."""
    return ["## Running it", "",
            "A unit with a committed record is never redone; a unit killed half-way is redone from its last "
            "training checkpoint. The priority order: CE+Dice seeds 0–2, the seed papers' losses, the others, then "
            "the long regime.", "", "```bash",
            "nice -n 19 python pipelines/calibration_study.py --budget-min 120 --threads 1   # in the background, on CPU",
            "python pipelines/calibration_study.py --budget-min 8 --device cuda --jobs 8 --hardware '1x H200'  # a lent GPU",
            "python pipelines/calibration_study.py --tables-only   # this file, what_to_use.md and recipe.yaml, from the records",
            "```", ""]


def training_minutes(records: Mapping[Job, dict[str, Any]]) -> float:
    return sum(float(r.get("training", {}).get("seconds", 0.0)) for r in records.values()) / 60


def unit_minutes(records: Mapping[Job, dict[str, Any]]) -> float:
    return sum(unit_seconds(r) for r in records.values()) / 60


def _shown(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def protocol_lines(args: argparse.Namespace) -> list[str]:
    k = args.folds or (4 if args.protocol == "validation" else 5)
    cases = "the validation cases" if args.protocol == "validation" else "the training + validation cases"
    return [
        "## Protocol (fixed before running)", "",
        f"- Candidates: loss × post-hoc calibrator ({', '.join(args.calibrators)}, or none) × fit region "
        f"({', '.join(args.regions)}), per regime.",
        f"- Calibrators are fitted and scored by {k}-fold cross-validation over {cases} (protocol "
        f"`{args.protocol}`); the test cases are never in a fold. The default protocol is `validation`: the "
        "100-case `nontest` protocol would fit and score calibrators mostly on the network's own training cases, "
        "where it is more confident and more often right than on unseen cases (calibrators fitted there "
        "under-correct; their scores flatter over-fitted losses).",
        "- Criterion: per seed, the mean of out-of-fold NLL, ECE all, ECE foreground and ECE boundary, each divided "
        "by the same seed's uncalibrated CE+Dice value; averaged over seeds; lower is better.",
        f"- Admissible only if the mean foreground Dice (validation Dice + the calibrator's out-of-fold Dice change) "
        f"is within {100 * args.dice_tolerance:.1f} point of CE+Dice's, and none of the four ratios exceeds 1 "
        "(no region worse calibrated than uncalibrated CE+Dice: a gain on one region cannot pay for a loss on another).",
        "- The recipe is the admissible candidate with the lowest score; each seed's calibrator is refitted on all "
        "the protocol's cases and applied once to that seed's test maps.",
        "- Seed noise: a difference between two recipes is larger than seed noise when the per-seed differences "
        "share a sign and |mean| > 2 × their standard deviation.", "",
    ]


def write_results(study: StudyResults, path: Path) -> None:
    args = study.args
    first = min((j for j in study.records if j.regime == "short"), default=min(study.records))
    recipe = study.records[first]["settings"]["recipe"]  # as run (smoke sizes included)
    ran = sorted({f"{r['ran']['hardware']} ({r['ran']['device']})" for r in study.records.values()})
    counts = {regime: sum(1 for j in study.records if j.regime == regime) for regime in args.regimes}
    lines = ["# Calibration study v3: hippocampus MRI (MSD Task04), 3D U-Net", ""]
    lines += [f"Rebuilt by `python {shlex.join(['pipelines/calibration_study.py', *sys.argv[1:]])}` "
              f"({time.strftime('%Y-%m-%d')}) from the {len(study.records)} unit records in "
              f"`{_shown(args.records)}` ({', '.join(f'{n} {r}' for r, n in counts.items())}): "
              f"{unit_minutes(study.records):.0f} min of unit time in all, {training_minutes(study.records):.0f} of it "
              "training. A unit is one (regime, loss, seed) run taken from training to its test numbers.", ""]
    lines += protocol_lines(args)
    lines += ["## Setup", "",
              f"- Recipe (`configs/hippocampus/base.yaml` as run by {first.folder}): {recipe['model']} channels "
              f"{recipe['channels']}, {recipe['num_res_units']} residual units, whole volumes padded to "
              f"{recipe['patch_size']}, batch {recipe['batch_size']}, {recipe['optimizer']} lr {recipe['lr']}, no "
              f"augmentation; best checkpoint by validation Dice. Losses: {', '.join(args.losses)}.",
              "- Regions are defined on the ground truth: all voxels, foreground (label ≠ 0), boundary band (≤ 2 mm from "
              "a foreground edge, both sides). HD95 in mm.", ""]
    lines += ["## Where the numbers come from", "",
              f"- Machines: {'; '.join(ran)}. Seeds: {', '.join(map(str, sorted({j.seed for j in study.records})))}. "
              f"Epochs: {schedules(study)}.",
              f"- Heavy outputs under `{_shown(args.out)}` (not committed); config overrides for every run: "
              f"{', '.join(f'`{o}`' for o in args.set) or 'none'}.",
              f"- Test numbers: the {study.test_cases} test cases of the manifest (pooled ECE over all voxels of all "
              "cases, 15 bins; per-volume ECE fg: the mean over volumes), mean ± std over seeds; every candidate's "
              "test numbers are in its unit's record, computed in one pass over the test maps.", ""]
    lines += rerun_lines(args)
    lines += recipe_lines(study)
    for regime in args.regimes:
        raw = {loss: study.raw(regime, loss) for loss in args.losses}
        lines += [f"## {regime.capitalize()} regime", "", "### Test, raw networks (T = 1)", ""]
        lines += summary_table(raw, "loss") + [""]
        lines += ["### Test, each loss with its cross-validated calibrator", ""]
        rows = {f"{loss} + {c.candidate.calibrator} ({c.candidate.region})" + ("" if c.admissible else " †"):
                study.with_calibrator(regime, loss) for (r, loss), c in study.chosen.items() if r == regime}
        lines += summary_table(rows, "loss + calibrator (fit region)")
        lines += ["", "† no admissible candidate for this loss: its best-scoring one.", ""]
        log_rows = study.scored[regime]
        lines += ["### Cross-validated selection log", "",
                  f"Out-of-fold ratios to uncalibrated CE+Dice (means over seeds), best first; the first {TOP} of "
                  f"{len(log_rows)} candidates, then all of them.", ""]
        lines += cv_log(log_rows[:TOP]) + ["", "<details><summary>every candidate</summary>", ""]
        lines += cv_log(log_rows) + ["", "</details>", ""]
    lines += claims_lines(study)
    bias = ("this study fitted and chose calibrators on validation cases only, which avoids that bias at the price of "
            "noisier folds (a quarter of 16 cases held out at a time)" if args.protocol == "validation" else
            "this study fitted and chose them on the training + validation cases (protocol `nontest`), so its "
            "out-of-fold scores and fitted calibrators carry that bias: rerun with `--protocol validation` to check")
    lines += ["## Caveats", "",
              "- Calibrator statistics on the network's own training cases are biased (the network is over-confident "
              f"and more often right on data it was trained on); {bias}.",
              "- The Dice constraint adds the calibrator's out-of-fold change of the pooled Dice to the per-case mean "
              "validation Dice: an approximation for calibrators that change the argmax (temperatures do not).",
              "- One dataset (two small structures) and one small 3D U-Net: one data point, not a verdict on the methods.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "\n".join(lines) + "\n")


def recipe_lines(study: StudyResults) -> list[str]:
    if study.recipe is None:
        return ["## Recommended recipe", "", "No candidate could be scored (is ce_dice in the study?).", ""]
    c = study.recipe.candidate
    mine, ref = study.with_calibrator(c.regime, c.loss), study.raw(c.regime, BASELINE)
    if c.calibrator == NONE:
        mine = study.raw(c.regime, c.loss)
    status = "" if study.recipe.admissible else " — **no candidate was admissible; this is the closest one**"
    lines = ["## Recommended recipe", "",
             f"**{c.loss}, {c.regime} regime, {c.calibrator}" + ("" if c.calibrator == NONE else f" fitted on {c.region} voxels")
             + f"**{status} (chosen by cross-validation, criterion {study.recipe.score:.3f} ± {study.recipe.score_std:.3f}). "
             "Test cases:", ""]
    rows = {"recipe": mine, "CE+Dice, T = 1": ref, "CE+Dice + its calibrator": study.with_calibrator(c.regime, BASELINE)}
    if study.ensemble is not None:
        rows[f"ensemble of the recipe's {len(mine)} seeds"] = {0: study.ensemble}
    lines += summary_table(rows, "") + ["", "Paired by seed, recipe − CE+Dice (T = 1):", ""]
    lines += paired_table(mine, ref) + ["", "Targets (means over seeds):", ""] + targets(mine, ref) + [""]
    lines += ["To reproduce it:", "", "```bash", *recipe_commands(c, study.args), "```", ""]
    return lines


def recipe_commands(c: Candidate, args: argparse.Namespace) -> list[str]:
    """``segcalib`` commands: train, export validation and test maps with logits, fit, apply."""
    config = CONFIGS / f"{c.loss}.yaml"
    cfg = load_config(config)
    sets = "" if c.regime == "short" else (f" --set train.epochs={cfg.train.epochs * args.long_factor}"
                                           " --set train.scheduler=none")
    manifest = _shown(cfg.data.manifest)
    commands = [f"segcalib train --config {_shown(config)} --run-dir runs/recipe{sets}"]
    commands += [f"segcalib export --run runs/recipe --manifest {manifest} --split {s} --logits --output runs/recipe/exports/{s}"
                 for s in ("validation", "test")]
    if c.calibrator != NONE:
        commands += [f"segcalib calibrate fit --predictions runs/recipe/exports/validation --manifest {manifest} "
                     f"--split validation --method {c.calibrator} --region {c.region} --output runs/recipe/calibrator",
                     "segcalib calibrate apply --calibrator runs/recipe/calibrator --predictions runs/recipe/exports/test "
                     "--output runs/recipe/exports/test_calibrated"]
        if args.protocol == "nontest":
            commands.insert(-2, "# the study fitted on the training and validation maps together (protocol nontest)")
    return commands


def claims_lines(study: StudyResults) -> list[str]:
    lines = ["## The papers' claims", "",
             "Per seed: the mean of test NLL, ECE all, ECE fg and ECE boundary, each divided by uncalibrated CE+Dice's "
             "(same seed); the difference better − worse paired by seed (negative: the claim's direction).", ""]
    body = []
    for regime in study.args.regimes:
        ref = study.raw(regime, BASELINE)
        raw = {l: test_scores(study.raw(regime, l), ref) for l in study.args.losses}
        cal = {l: test_scores(study.with_calibrator(regime, l), ref) for l in study.args.losses
               if study.with_calibrator(regime, l)}
        for claim in CLAIMS:
            if not (raw.get(claim.better) and raw.get(claim.worse)):
                continue
            verdict, d_raw, d_cal = check(claim, raw, cal)
            shown = "–" if d_cal is None else f"{d_cal.mean:+.3f} ± {d_cal.std:.3f}"
            body.append([claim.text, claim.source, regime, f"{d_raw.mean:+.3f} ± {d_raw.std:.3f}", shown, verdict])
    return lines + markdown_table(["claim", "source", "regime", "raw: better − worse", "calibrated: better − worse",
                                   "verdict"], body) + [""]


def _mean_std(rows: Mapping[int, dict[str, Any]], key: str, digits: int) -> str:
    values = [float(v[key]) for v in rows.values()]
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def what_to_use_text(study: StudyResults, link: str) -> str:
    """The recipe in one paragraph: what to run, its test numbers (mean ± std over seeds) against
    CE+Dice raw and calibrated the same way, its Dice cost, and the targets it misses."""
    if study.recipe is None:
        return f"No recipe could be chosen; see [{link}]({link})."
    c = study.recipe.candidate
    mine = study.with_calibrator(c.regime, c.loss) if c.calibrator != NONE else study.raw(c.regime, c.loss)
    ref = study.raw(c.regime, BASELINE)
    ref_cal = study.with_calibrator(c.regime, BASELINE)
    post = "no post-hoc calibrator" if c.calibrator == NONE else (
        f"`segcalib calibrate fit --method {c.calibrator} --region {c.region}` on held-out validation maps "
        "(`segcalib export --logits`), then `segcalib calibrate apply` on new maps")
    shown = [("ece_foreground", "foreground ECE", 4), ("ece_boundary", "boundary ECE", 4),
             ("ece_all", "all-voxel ECE", 4), ("media_foreground_ece", "per-volume foreground ECE", 4),
             ("nll", "NLL", 4)]
    numbers = ", ".join(f"{text} {_mean_std(mine, key, d)} (CE+Dice {_mean_std(ref, key, d)})" for key, text, d in shown)
    dice = paired({s: float(v["dice_fg"]) for s, v in mine.items()}, {s: float(v["dice_fg"]) for s, v in ref.items()})
    dice_text = (f"Its Dice cost: foreground Dice {_mean_std(mine, 'dice_fg', 4)} against {_mean_std(ref, 'dice_fg', 4)}, "
                 f"{100 * dice.mean:+.2f} ± {100 * dice.std:.2f} point paired by seed "
                 f"({'beyond' if dice.beyond_noise else 'within'} seed noise).")
    missed = [line.split(": ", 1)[1] for line in targets(mine, ref) if line.startswith("- **not met**")]
    target_text = ("It meets every target of the study." if not missed else
                   f"It meets {len(TARGETS) - len(missed)} of the study's {len(TARGETS)} targets; not met: "
                   + "; ".join(missed) + ".")
    text = (f"**What to use.** Train with `configs/hippocampus/{c.loss}.yaml` ({c.regime} schedule), then {post}. "
            f"On the {study.test_cases} test cases (mean ± std over {len(mine)} seeds, against plain CE+Dice at T = 1): "
            f"{numbers}. {dice_text} {target_text}")
    if ref_cal and c.loss != BASELINE and c.calibrator != NONE:
        base = study.chosen[(c.regime, BASELINE)].candidate
        fg = paired({s: float(v["ece_foreground"]) for s, v in mine.items()},
                    {s: float(v["ece_foreground"]) for s, v in ref_cal.items()})
        text += (f" If you keep CE+Dice, calibrate it with `{base.calibrator}` ({base.region}): foreground ECE "
                 f"{_mean_std(ref_cal, 'ece_foreground', 4)}, NLL {_mean_std(ref_cal, 'nll', 4)}; the recipe's foreground "
                 f"ECE is {fg.mean:+.4f} ± {fg.std:.4f} from it, paired by seed "
                 f"({'beyond' if fg.beyond_noise else 'within'} seed noise).")
    if not study.recipe.admissible:
        text += " No candidate met the selection constraints; this is the closest."
    return (text + f" It was chosen by cross-validation on non-test cases; the protocol, every loss and "
            f"calibrator, and the checks of the papers' claims are in [{link}]({link}).")


def write_what_to_use(study: StudyResults, path: Path, results: Path) -> None:
    """The short paragraph the README links to."""
    link = results.name if results.parent == path.parent else _shown(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "# What to use\n\n" + what_to_use_text(study, link) + "\n")


def write_recipe(study: StudyResults, path: Path, complete: bool) -> None:
    """``docs/results/recipe.yaml``: the recipe ``segcalib demo`` trains and calibrates with."""
    if study.recipe is None:
        return
    c = study.recipe.candidate
    region = c.region if c.calibrator != NONE else ALL  # a recipe without a calibrator has no fit region
    recipe = Recipe(loss=c.loss, calibrator=c.calibrator, region=region, regime=c.regime,
                    admissible=bool(study.recipe.admissible), score=round(float(study.recipe.score), 4),
                    records=len(study.records), complete=complete)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, recipe.to_yaml())


def study_from_records(records: Mapping[Job, dict[str, Any]], args: argparse.Namespace) -> StudyResults | None:
    """Everything the tables show, from the unit records alone (None without a CE+Dice record).

    Only the regimes and losses of ``args`` are shown; the choice per loss and the recipe follow
    the criterion fixed in :mod:`pipelines.study.selection`, and each chosen candidate's test numbers
    are read from the same record."""
    records = {j: r for j, r in records.items() if j.regime in args.regimes and j.loss in args.losses}
    if not any(j.loss == BASELINE for j in records):
        return None
    results = results_from_records(records)
    regimes = [r for r in args.regimes if any(j.regime == r for j in records)]
    scored = {regime: score_candidates(results, regime, args.dice_tolerance) for regime in regimes}
    chosen = {(regime, loss): best(scored[regime], loss) for regime in regimes for loss in args.losses}
    chosen = {key: value for key, value in chosen.items() if value is not None}
    calibrated = {}
    for (regime, loss), pick in chosen.items():
        c = pick.candidate
        for job, record in records.items():
            if (job.regime, job.loss) == (regime, loss):
                calibrated[(job, c.calibrator, c.region)] = record["test"][candidate_key(c.calibrator, c.region)]["summary"]
    recipe = recommend(scored)
    test_cases = max(len(r["test"][NONE]["cases"]) for r in records.values())
    args = argparse.Namespace(**{**vars(args), "regimes": regimes})
    return StudyResults(results, scored, chosen, calibrated, recipe, None, args, 0.0, test_cases, dict(records))
