"""``segcalib demo``: CE+Dice and the study's recommended recipe, trained, calibrated, evaluated and
compared on the embedded hippocampus data."""

from __future__ import annotations

import argparse
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
HELP = "the whole path on the embedded demo data: CE+Dice beside the study's recipe (reuses finished runs)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    from segcalib.calibrators import list_calibrators
    from segcalib.losses import list_losses
    from segcalib.spatial.regions import available_regions

    p = sub.add_parser(
        "demo",
        help=HELP,
        description="Reads the study's recommended recipe (docs/results/recipe.yaml: a loss, a calibrator and the voxels it "
        "is fitted on), then for CE+Dice and for the recipe's loss: trains configs/demo.yaml with that loss (or reuses/"
        "resumes runs/demo/<loss>), exports the test split, fits the recipe's calibrator on the validation maps and "
        "applies it, evaluates every variant and writes one comparison report (runs/demo/comparison.html).",
    )
    p.add_argument("--config", default=str(REPO_ROOT / "configs" / "demo.yaml"), help="demo experiment")
    p.add_argument("--run-dir", default="runs/demo", help="folder of the runs, one per loss (default runs/demo)")
    p.add_argument("--recipe", default=str(REPO_ROOT / "docs" / "results" / "recipe.yaml"),
                   help="the recommended recipe (default docs/results/recipe.yaml, written by the study)")
    p.add_argument("--losses", nargs="+", choices=list_losses(), metavar="LOSS",
                   help="losses to train and compare (default: ce_dice and the recipe's loss)")
    p.add_argument("--calibrator", choices=("auto", "none", *list_calibrators()),
                   help="post-hoc calibrator for every loss (default: the recipe's; auto: chosen by cross-validation)")
    p.add_argument("--calibrator-region", choices=available_regions(),
                   help="validation voxels the calibrator is fitted on (default: the recipe's)")
    p.add_argument("--temperature-regions", nargs="*", default=[], choices=available_regions(),
                   help="also export with a temperature fitted on these validation voxels (one export each)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from segcalib.experiment import BASELINE_LOSS, compare_losses, read_recipe

    recipe = read_recipe(args.recipe)
    recipe = replace(recipe, calibrator=args.calibrator or recipe.calibrator,
                     region=args.calibrator_region or recipe.region)
    losses = args.losses or [BASELINE_LOSS, recipe.loss]
    status = "" if recipe.complete else f" (interim: chosen from {recipe.records} study records, grid not complete)"
    print(f"recipe: {recipe.loss} + {recipe.calibrator} fitted on {recipe.region} voxels{status}")
    results = compare_losses(args.config, Path(args.run_dir), losses, recipe, overrides=args.overrides,
                             temperature_regions=args.temperature_regions)
    for loss, result in results.items():
        print(result.describe())
        for variant, path in result.reports.items():
            print(f"  {loss + ' ' + variant:<32} {path.with_name('report.html')}")
    print(f"report: {Path(args.run_dir) / 'comparison.html'}")
    return 0
