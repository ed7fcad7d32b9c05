"""``segcalib evaluate --predictions DIR --manifest M [--split test] --output DIR``."""

from __future__ import annotations

import argparse

from segcalib.cli._args import LazyChoices, prediction_folder_args, bin_count, positive_mm

HELP = "calibration (ECE/CECE/NLL/Brier per region) and Dice/HD95/ASSD of exported maps"


def _protocols() -> list[str]:
    from segcalib.reports.protocols import PROTOCOLS

    return list(PROTOCOLS)


def _binnings() -> list[str]:
    from segcalib.metrics.registry import list_binnings

    return list(list_binnings())


def add_parser(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser(
        "evaluate",
        help=HELP,
        description="Writes OUTPUT/report.json and a self-contained OUTPUT/report.html. Runs under "
        "torchrun too (cases shared out, metric states all-reduced).",
    )
    prediction_folder_args(p)
    p.add_argument("--manifest", required=True, help="manifest with the ground truth")
    p.add_argument("--split", default="test", choices=("training", "validation", "test"))
    p.add_argument("--output", required=True, help="report folder")
    p.add_argument("--protocol", default=None, choices=LazyChoices(_protocols), metavar="PROTOCOL",
                   help="preset that reproduces a tool's or paper's table (default: segcalib's own; the presets and "
                   "their sources are in docs/metrics.md)")
    p.add_argument("--bins", type=bin_count, default=None, help="reliability bins (default: the protocol's)")
    p.add_argument("--binning", default="equal-width", choices=LazyChoices(_binnings), metavar="BINNING",
                   help="equal-mass adds the pooled top-label adaptive ECE beside the equal-width one (default equal-width)")
    p.add_argument("--no-uncertainty", action="store_true",
                   help="skip the uncertainty-quality section (AURC, AUROC, UEO, QU-BraTS per map and region)")
    p.add_argument("--boundary-mm", type=positive_mm, default=None,
                   help="half-width of the boundary band in mm, finite and > 0 (default: the export's, else 2)")
    p.add_argument("--conformal", default=None,
                   help="a segcalib conformal fit folder: add the conformal section (test risk, mask sizes)")
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda when available)")
    p.add_argument("--split-seed", type=int, default=None,
                   help="seed of the split made when the manifest has no validation/test lists (default: the one "
                   "recorded in the export's export.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segcalib.utils.files import remove_stale_temporaries
    from segcalib.utils.locks import folder_lock

    command = f"evaluate --predictions {args.predictions} --output {args.output}"
    with folder_lock(args.output, command=command, what="--output"):
        from segcalib.reports import evaluate
        from segcalib.utils.distributed import init_from_env, is_main_process, shutdown

        init_from_env()
        try:
            report = evaluate(args.predictions, args.manifest, args.output, split=args.split, n_bins=args.bins,
                              boundary_mm=args.boundary_mm, device=args.device, split_seed=args.split_seed,
                              **({} if args.protocol is None else {"protocol": args.protocol}), binning=args.binning,
                              uncertainty=not args.no_uncertainty, conformal=args.conformal,
                              format=args.format, channel_axis=args.channel_axis, input=args.input)
            main_process = is_main_process()
        finally:
            shutdown()
        if main_process:
            remove_stale_temporaries(args.output)  # left by a killed run; this one completed the folder
    if main_process:
        s = report["summary"]
        print(
            f"{report['counts']['cases']} cases: Dice fg {s['dice_fg']:.4f}, HD95 {s['hd95']:.2f} mm, "
            + ", ".join(f"ECE {region} {s[f'ece_{region}']:.4f}" for region in report["calibration"])
        )
        for name, row in ((report.get("conformal") or {}).get("targets") or {}).items():
            print(f"conformal {report['conformal']['risk']} {name}: test risk {row['test_risk']:.4f} (alpha "
                  f"{row['alpha']:g}, {row['n']} cases), mask {row['size_vs_truth']:.2f}x the truth")
        print(f"protocol {report['metadata']['protocol']}; report: {args.output}/report.html")
    return 0
