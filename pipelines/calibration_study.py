"""The calibration study: do the seed papers' claims hold on real data in segcalib?

For one manifest and one 3D U-Net recipe (``configs/hippocampus/``), train the same network with
each loss (seeded, equal budget) in two regimes, export the validation and test splits with
T = 1 and with temperatures fitted on three regions of the validation voxels, evaluate, and write
``docs/results.md`` plus a figure of overlaid reliability diagrams.

- ``short``: the recipe's schedule (cosine decay).
- ``long``: twice the epochs (``--long-factor``) at a constant learning rate, where CE becomes
  over-confident.
- Margin search (``--margins``, short regime): MbLS / MbLS+Dice with other margins, selected on the
  *validation* split only; the recommended recipe is chosen on validation data only, then its
  held-out test numbers are reported.

Resumable: a finished run is reused, complete exports are skipped, reports newer than their
export are kept. Run ``python pipelines/calibration_study.py --help``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segcalib.config import load_config  # noqa: E402
from segcalib.experiment import run_experiment  # noqa: E402
from segcalib.reports.figures import Curve, reliability_png  # noqa: E402
from segcalib.reports.evaluation import read_report  # noqa: E402
from segcalib.reports.markdown import markdown_table  # noqa: E402
from segcalib.spatial.regions import FOREGROUND, default_regions  # noqa: E402

log = logging.getLogger("segcalib.study")
LOSSES = ("ce", "ce_dice", "focal", "ls", "ecp", "svls", "nacl", "mbls", "mbls_dice", "cals")
LONG_LOSSES = ("ce", "ce_dice", "mbls", "cals")
REGIONS = default_regions()
VARIANTS = ("T1",) + tuple(f"Tfit_{r}" for r in REGIONS)
COLUMNS = [
    ("dice_fg", "Dice fg", 4),
    ("hd95", "HD95 (mm)", 3),
    ("ece_all", "ECE all", 4),
    ("ece_foreground", "ECE fg", 4),
    ("ece_boundary", "ECE boundary", 4),
    ("cece", "CECE", 4),
    ("nll", "NLL", 4),
    ("brier", "Brier", 4),
    ("temperature", "T", 3),
]


@dataclass(frozen=True)
class Job:
    regime: str
    loss: str
    seed: int
    margin: float | None = None

    @property
    def method(self) -> str:
        return self.loss if self.margin is None else f"{self.loss} (m={self.margin:g})"

    @property
    def folder(self) -> str:
        tag = self.loss if self.margin is None else f"{self.loss}_m{self.margin:g}"
        return f"{self.regime}/{tag}/seed{self.seed}"


def regime_overrides(regime: str, base_epochs: int, long_factor: int) -> list[str]:
    if regime == "short":
        return []
    return [f"train.epochs={base_epochs * long_factor}", "train.scheduler=none", f"train.val_every={5 * long_factor}"]


def run_job(job: Job, args: argparse.Namespace) -> dict[str, dict[str, dict[str, Any]]]:
    """Train/export/evaluate one job on validation and test; returns split -> variant -> summary."""
    config = REPO / "configs" / "hippocampus" / f"{job.loss}.yaml"
    base_epochs = load_config(config).train.epochs
    overrides = [f"train.seed={job.seed}", f"name=study_{job.regime}_{job.folder.replace('/', '_')}"]
    overrides += regime_overrides(job.regime, base_epochs, args.long_factor)
    overrides += [f"train.epochs={args.epochs}"] if args.epochs and job.regime == "short" else []
    if job.margin is not None:
        overrides.append(f"loss.margin={job.margin}")
    overrides += list(args.set or [])
    run_dir = args.out / job.folder
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for split in ("validation", "test"):
        started = time.time()
        result = run_experiment(
            config, run_dir, overrides=overrides, split=split, temperature_regions=REGIONS, progress=False
        )
        results[split] = {variant: summary for variant, summary in result.summaries.items()}
        log.info("%s [%s] done in %.0f s", job.folder, split, time.time() - started)
    return results


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    kept = [v for v in values if v is not None and not math.isnan(v)]  # inf (a missed structure) stays
    if not kept:
        return math.nan, math.nan
    if not all(math.isfinite(v) for v in kept):
        return statistics.fmean(kept), math.nan
    return statistics.fmean(kept), (statistics.stdev(kept) if len(kept) > 1 else 0.0)


def fmt(mean: float, std: float, digits: int, n: int) -> str:
    if math.isnan(mean):
        return "–"
    if math.isinf(mean):
        return "inf"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")


def table(rows: dict[str, list[dict[str, Any]]], first: str = "loss") -> list[str]:
    """Markdown table; ``rows`` maps method -> summaries over seeds."""
    body = [
        [method] + [fmt(*mean_std([x.get(key) for x in summaries]), digits, len(summaries)) for key, _, digits in COLUMNS]
        for method, summaries in rows.items()
    ]
    return markdown_table([first] + [title for _, title, _ in COLUMNS], body)


def collect(results: dict[Job, dict], regime: str, split: str, variant: str, margins: bool = False) -> dict[str, list]:
    rows: dict[str, list] = {}
    for job, res in results.items():
        if job.regime != regime or (job.margin is not None) != margins:
            continue
        rows.setdefault(job.method, []).append(res[split][variant])
    return rows


def choose_recipe(results: dict[Job, dict], dice_tolerance: float) -> tuple[Job, str, list[str]]:
    """Pick (job, variant) by validation foreground ECE among those whose validation Dice is within
    ``dice_tolerance`` of CE+Dice's (same regime); returns the choice and the search log."""
    lines = []
    best: tuple[float, Job, str] | None = None
    for regime in sorted({j.regime for j in results}):
        reference = [r["validation"]["T1"]["dice_fg"] for j, r in results.items() if j.regime == regime and j.loss == "ce_dice" and j.margin is None]
        if not reference:
            continue
        dice_ref = statistics.fmean(reference)
        for job, res in results.items():
            if job.regime != regime or job.seed != min(j.seed for j in results):
                continue
            for variant in VARIANTS:
                s = res["validation"][variant]
                ok = s["dice_fg"] >= dice_ref - dice_tolerance
                lines.append(
                    f"| {regime} | {job.method} | {variant} | {s['dice_fg']:.4f} | {s['ece_foreground']:.4f} | {'yes' if ok else 'no'} |"
                )
                if ok and (best is None or s["ece_foreground"] < best[0]):
                    best = (s["ece_foreground"], job, variant)
    if best is None:
        raise SystemExit("no candidate recipe: is ce_dice in the study?")
    return best[1], best[2], lines


def reliability_figure(results: dict[Job, dict], regime: str, variant: str, region: str, path: Path, args) -> None:
    curves = []
    for job in sorted((j for j in results if j.regime == regime and j.margin is None and j.seed == min(args.seeds)), key=lambda j: LOSSES.index(j.loss)):
        report = read_report(args.out / job.folder / "reports" / f"test_{variant}" / "report.json")
        bins = report["calibration"][region]["reliability"]
        curves.append(Curve(job.method, bins["confidence"], bins["accuracy"], bins["count"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(reliability_png(curves, f"{regime} regime, {region} voxels, {variant}", with_histogram=False))


def training_minutes(results: dict[Job, dict], out: Path) -> float:
    """Training time summed over the runs' ``metrics.csv`` (epochs only; export and evaluation excluded)."""
    total = 0.0
    for job in results:
        with open(out / job.folder / "metrics.csv", newline="") as f:
            total += sum(float(row["seconds"]) for row in csv.DictReader(f) if row.get("seconds"))
    return total / 60


def recipe_commands(job: Job, variant: str, args: argparse.Namespace) -> list[str]:
    """The ``segcalib`` commands that reproduce a study job and its temperature variant."""
    config = REPO / "configs" / "hippocampus" / f"{job.loss}.yaml"
    overrides = regime_overrides(job.regime, load_config(config).train.epochs, args.long_factor)
    overrides += [f"loss.margin={job.margin:g}"] if job.margin is not None else []
    sets = "".join(f" --set {o}" for o in overrides)
    manifest = _shown(load_config(config).data.manifest)
    temperature = "--temperature none" if variant == "T1" else f"--temperature fit --temperature-region {variant.split('_', 1)[1]}"
    return [
        f"segcalib train --config {_shown(config)} --run-dir runs/recipe{sets}",
        f"segcalib export --run runs/recipe --manifest {manifest} --split test --output runs/recipe/exports/test {temperature}",
    ]


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def write_results(results: dict[Job, dict], args: argparse.Namespace, elapsed: float) -> None:
    doc = args.results
    regimes = [r for r in ("short", "long") if any(j.regime == r for j in results)]
    cfg = load_config(REPO / "configs" / "hippocampus" / "base.yaml")
    lines = ["# Calibration study: hippocampus MRI (MSD Task04), 3D U-Net", ""]
    lines += [
        "Generated by `python pipelines/calibration_study.py` "
        f"({time.strftime('%Y-%m-%d')}, on {args.hardware}): {len(results)} training runs, "
        f"{training_minutes(results, args.out):.0f} min of training in all (this invocation: {elapsed / 60:.0f} min; "
        "finished runs are reused, not retrained).",
        "",
        "## Setup",
        f"- Data: `{Path(cfg.data.manifest).relative_to(REPO)}`: the 120 embedded cases, 84 training / 16 validation / 20 test "
        "(seeded split, `data_manifests/make_hippocampus_manifests.py`). Every number below is on the 20 **test** cases "
        "unless it says validation; nothing was tuned on them.",
        f"- Recipe (`configs/hippocampus/base.yaml`): MONAI UNet channels {cfg.model.params['channels']}, "
        f"{cfg.model.params.get('num_res_units')} residual units, whole volumes padded to {cfg.data.patch_size}, "
        f"batch {cfg.train.batch_size}, AdamW lr {cfg.train.lr}, per-volume z-score, no augmentation; best checkpoint "
        "by validation mean foreground Dice.",
        f"- Regimes: **short** = {cfg.train.epochs} epochs, cosine decay; **long** = {cfg.train.epochs * args.long_factor} "
        "epochs at a constant learning rate (over-confident CE).",
        f"- Seeds: {', '.join(str(s) for s in args.seeds)}" + (" (mean ± std over seeds)" if len(args.seeds) > 1 else "") + ".",
        "- Metrics: pooled over all voxels of all test cases (dataset-level), 15 bins; regions are defined on the ground "
        "truth: all voxels, foreground (label ≠ 0), boundary band (≤ 2 mm from a foreground edge, both sides). "
        "HD95 in mm (MONAI convention). T = fitted temperature (1 = none).",
        "",
    ]
    for regime in regimes:
        lines += [f"## {regime.capitalize()} regime: raw probabilities (T = 1)", ""]
        lines += table(collect(results, regime, "test", "T1"))
        lines += [""]
        for region in REGIONS:
            lines += [f"### {regime.capitalize()} regime: temperature fitted on validation `{region}` voxels", ""]
            lines += table(collect(results, regime, "test", f"Tfit_{region}"))
            lines += [""]
        figure = Path("figures") / f"reliability_{regime}_foreground.png"
        reliability_figure(results, regime, "T1", FOREGROUND, doc.parent / figure, args)
        lines += [f"![reliability, {regime} regime, foreground voxels, T = 1]({figure.as_posix()})", ""]
    margin_jobs = [j for j in results if j.margin is not None]
    if margin_jobs:
        lines += ["## Margin search (validation split only)", ""]
        for regime in regimes:
            rows = collect(results, regime, "validation", "T1", margins=True)
            rows.update({k: v for k, v in collect(results, regime, "validation", "T1").items() if k in ("mbls", "mbls_dice", "cals")})
            if rows:
                lines += [f"### {regime} regime, validation, T = 1", ""] + table(rows, "loss (margin)") + [""]
    lines += ["## What was run", "", f"- Command: `python {shlex.join(sys.argv)}`", f"- Hardware: {args.hardware}",
              f"- Python {platform.python_version()}; run folders under `{_shown(args.out)}` (not committed).", ""]
    if args.conclusions and args.conclusions.exists():
        lines += [args.conclusions.read_text().strip(), ""]
    job, variant, search = choose_recipe(results, args.dice_tolerance)
    lines += [
        "## Recipe selection (validation split only)",
        "",
        f"Candidates: every method and temperature variant of seed {min(args.seeds)}; kept if its validation mean "
        f"foreground Dice is within {args.dice_tolerance} of CE+Dice's in the same regime; chosen by the lowest validation "
        "foreground ECE.",
        "",
        "| regime | method | temperature | val Dice fg | val ECE fg | Dice kept |",
        "|---|---|---|---|---|---|",
        *search,
        "",
    ]
    chosen = [r["test"][variant] for j, r in results.items() if j.regime == job.regime and j.loss == job.loss and j.margin == job.margin]
    reference = [r["test"]["T1"] for j, r in results.items() if j.regime == job.regime and j.loss == "ce_dice" and j.margin is None]
    lines += ["## Recommended recipe", ""]
    lines += [f"**{job.method}, {job.regime} regime, {variant}** (chosen on validation data only). Held-out test:", ""]
    lines += table({f"{job.method} ({variant})": chosen, "ce_dice (T1)": reference})
    ratio = mean_std([c["ece_foreground"] for c in chosen])[0] / mean_std([c["ece_foreground"] for c in reference])[0]
    dice_gap = mean_std([c["dice_fg"] for c in chosen])[0] - mean_std([c["dice_fg"] for c in reference])[0]
    lines += [
        "",
        f"Pooled foreground ECE: {ratio:.2f}× CE+Dice's (target ≤ 0.33×); mean foreground Dice difference "
        f"{100 * dice_gap:+.2f} points (target within ±0.5).",
        "",
        "To train and export with it:",
        "",
        "```bash",
        *recipe_commands(job, variant, args),
        "```",
        "",
    ]
    doc.write_text("\n".join(lines) + "\n")
    (args.out / "study.json").write_text(
        json.dumps([{"job": job.__dict__, "results": res} for job, res in results.items()], indent=1, default=str)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regimes", nargs="+", default=["short", "long"], choices=["short", "long"])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--long-losses", nargs="+", default=list(LONG_LOSSES), choices=list(LOSSES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--margins", nargs="*", type=float, default=[], help="extra margins for mbls, mbls_dice, cals")
    parser.add_argument("--margin-losses", nargs="+", default=["mbls", "mbls_dice"], choices=list(LOSSES))
    parser.add_argument("--long-factor", type=int, default=2, help="long regime: this many times the epochs")
    parser.add_argument("--epochs", type=int, default=None, help="override the short regime's epochs")
    parser.add_argument("--set", action="append", help="extra config overrides for every run")
    parser.add_argument("--dice-tolerance", type=float, default=0.005)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "study")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--conclusions", type=Path, default=REPO / "docs" / "results_conclusions.md",
                        help="hand-written conclusions appended to the results (if the file exists)")
    parser.add_argument("--hardware", default=f"{platform.machine()}, {platform.processor() or 'CPU'}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    jobs = []
    for regime in args.regimes:
        losses = args.losses if regime == "short" else [l for l in args.losses if l in args.long_losses]
        for seed in args.seeds:
            jobs += [Job(regime, loss, seed) for loss in losses]
            if regime == "short":  # the margin search runs on the short schedule only
                jobs += [Job(regime, loss, seed, m) for loss in losses if loss in args.margin_losses for m in args.margins]
    started = time.time()
    results = {job: run_job(job, args) for job in jobs}
    write_results(results, args, time.time() - started)
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
