"""``segcalib data check MANIFEST``: validate a dataset before any long job."""

from __future__ import annotations

import argparse

HELP = "dataset tools"


def add_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help=HELP)
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    check = data_sub.add_parser(
        "check", help="validate a manifest: files load, shapes/affines agree, labels are declared, images finite"
    )
    check.add_argument("manifest", help="manifest JSON (or MSD / nnU-Net dataset.json, or its folder)")
    check.add_argument("--split-seed", type=int, default=None,
                       help="seed of the split made when the manifest has no validation/test lists (default: segcalib's "
                       "fixed seed, as configs have it; use the config's data.split_seed)")
    check.add_argument("--allow-unlabelled", action="store_true",
                       help="training/validation cases without a label are a warning (they are left out), not an error")
    check.add_argument("--verbose", action="store_true", help="list every file behind a grouped warning")
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    from segcalib.data import check_manifest, load_manifest
    from segcalib.data.manifest import SPLIT_SEED

    split_seed = SPLIT_SEED if args.split_seed is None else args.split_seed
    manifest = load_manifest(args.manifest, split_seed=split_seed, allow_unlabelled=args.allow_unlabelled)
    summary = check_manifest(manifest)
    print(summary.format(verbose=args.verbose))
    print("ok: all files load and agree")
    return 0
