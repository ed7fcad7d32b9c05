"""``segcalib evaluate --predictions DIR --manifest M [--split test] --output DIR``."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="calibration (ECE/CECE/NLL/Brier per region) and Dice/HD95/ASSD of exported maps",
        description="Writes OUTPUT/report.json and a self-contained OUTPUT/report.html. Runs under "
        "torchrun too (cases shared out, metric states all-reduced).",
    )
    p.add_argument("--predictions", required=True, help="folder written by segcalib export")
    p.add_argument("--manifest", required=True, help="manifest with the ground truth")
    p.add_argument("--split", default="test", choices=("training", "validation", "test"))
    p.add_argument("--output", required=True, help="report folder")
    p.add_argument("--bins", type=int, default=15, help="reliability bins (default 15)")
    p.add_argument("--boundary-mm", type=float, default=None,
                   help="half-width of the boundary band in mm (default: the export's, else 2)")
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda when available)")
    p.add_argument("--split-seed", type=int, default=None,
                   help="seed of the split made when the manifest has no validation/test lists (default: the one "
                   "recorded in the export's export.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segcalib.errors import DataError
    from segcalib.reports import evaluate
    from segcalib.utils.distributed import init_from_env, is_main_process, shutdown

    if args.bins < 1:
        raise DataError(f"--bins: {args.bins} must be at least 1")
    if args.boundary_mm is not None and not args.boundary_mm > 0:
        raise DataError(f"--boundary-mm: {args.boundary_mm} must be positive")
    init_from_env()
    try:
        report = evaluate(args.predictions, args.manifest, args.output, split=args.split, n_bins=args.bins,
                          boundary_mm=args.boundary_mm, device=args.device, split_seed=args.split_seed)
        main_process = is_main_process()
    finally:
        shutdown()
    if main_process:
        s = report["summary"]
        print(
            f"{report['counts']['cases']} cases: Dice fg {s['dice_fg']:.4f}, HD95 {s['hd95']:.2f} mm, "
            + ", ".join(f"ECE {region} {s[f'ece_{region}']:.4f}" for region in report["calibration"])
        )
        print(f"report: {args.output}/report.html")
    return 0
