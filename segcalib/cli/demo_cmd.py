"""``segcalib demo``: train -> export -> evaluate -> report on the embedded hippocampus data."""

from __future__ import annotations

import argparse
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
HELP = "the whole path on the embedded demo data (reuses a finished demo run)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    from segcalib.spatial.regions import ALL, FOREGROUND, available_regions

    p = sub.add_parser(
        "demo",
        help=HELP,
        description="Trains configs/demo.yaml (or reuses/resumes runs/demo), exports the test split without "
        "calibration and with fitted temperatures, fits a calibrator on the validation maps (auto: chosen by "
        "cross-validation over cases) and applies it, evaluates every variant and writes one comparison report.",
    )
    p.add_argument("--config", default=str(REPO_ROOT / "configs" / "demo.yaml"), help="demo experiment")
    p.add_argument("--run-dir", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--temperature-regions", nargs="+", default=[ALL, FOREGROUND], choices=available_regions(),
                   help="validation voxels the temperatures are fitted on (one export each)")
    from segcalib.calibrators import list_calibrators

    p.add_argument("--calibrator", default="auto", choices=("auto", *list_calibrators()),
                   help="post-hoc calibrator fitted on the validation maps (default auto: chosen by cross-validation)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segcalib.experiment import run_experiment

    result = run_experiment(
        config=args.config,
        run_dir=Path(args.run_dir),
        overrides=args.overrides,
        temperature_regions=args.temperature_regions,
        calibrator=args.calibrator,
    )
    print(result.describe())
    for variant, path in result.reports.items():
        print(f"  {variant:<18} {path.with_name('report.html')}")
    print(f"report: {result.report_html}")
    return 0
