"""``segcalib conformal fit`` / ``segcalib conformal apply``: masks with a finite-sample guarantee."""

from __future__ import annotations

import argparse

from segcalib.cli._args import LazyChoices, prediction_folder_args, positive_mm

HELP = "conformal risk control: masks whose expected miss rate (or false discovery rate) is at most alpha"


def risk_names() -> tuple[str, ...]:
    from segcalib.conformal import RISKS

    return tuple(RISKS)

# alpha / delta are parsed as plain floats and checked by segcalib.conformal (one message, exit 2)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "conformal",
        help=HELP,
        description="Fit thresholds or margins on labelled cases with a finite-sample guarantee over new "
        "exchangeable cases (Conformal Risk Control; Learn-then-Test), then write the guaranteed masks. "
        "See docs/conformal.md.",
    )
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    def folder_args(q: argparse.ArgumentParser) -> None:
        prediction_folder_args(q)
        q.add_argument("--quiet", action="store_true", help="no progress bar")

    fit = verbs.add_parser("fit", help="choose thresholds / margins on a labelled split; writes CONF/conformal.json")
    folder_args(fit)
    fit.add_argument("--manifest", required=True, help="manifest with the ground truth")
    fit.add_argument("--split", default="validation", choices=("training", "validation", "test"))
    fit.add_argument("--risk", default="fnr", choices=LazyChoices(risk_names), metavar="RISK",
                     help="fnr: fraction of the structure missed (threshold p >= t, conformal risk control); "
                     "fdr: 1 - precision (Learn-then-Test); margin: fraction missed by the argmax mask "
                     "dilated or eroded by a margin in mm (default fnr)")
    fit.add_argument("--alpha", type=float, default=0.1, help="risk level in (0, 1) (default 0.1)")
    fit.add_argument("--delta", type=float, default=0.1,
                     help="Learn-then-Test: probability in (0, 1) that the fdr guarantee fails (default 0.1)")
    fit.add_argument("--inner-alpha", type=float, default=None,
                     help="also fit the inner mask: fdr <= this level with probability 1 - delta")
    fit.add_argument("--margin-step-mm", type=positive_mm, default=0.05, help="margin grid step in mm (default 0.05)")
    fit.add_argument("--margin-max-mm", type=positive_mm, default=20.0, help="largest margin in mm (default 20)")
    fit.add_argument("--split-seed", type=int, default=None,
                     help="seed of the split made when the manifest has no validation/test lists")
    fit.add_argument("--output", required=True, help="conformal folder (CONF)")
    fit.set_defaults(func=run_fit)

    apply = verbs.add_parser("apply", help="write <case>_conformal.nii.gz for every map of a prediction folder")
    folder_args(apply)
    apply.add_argument("--conformal", required=True, help="folder written by conformal fit")
    apply.add_argument("--output", required=True, help="output folder")
    apply.set_defaults(func=run_apply)


def run_fit(args: argparse.Namespace) -> int:
    from segcalib.utils.locks import folder_lock

    with folder_lock(args.output, command=f"conformal fit --output {args.output}"):
        from segcalib.conformal import ConformalOptions, fit_conformal

        record = fit_conformal(args.predictions, args.manifest, args.output, ConformalOptions(
            risk=args.risk, alpha=args.alpha, delta=args.delta, inner_alpha=args.inner_alpha, split=args.split,
            split_seed=args.split_seed, margin_step_mm=args.margin_step_mm, margin_max_mm=args.margin_max_mm,
            format=args.format, channel_axis=args.channel_axis, input=args.input, progress=not args.quiet))
    print(f"conformal {record['risk']} at alpha {record['alpha']:g} ({record['method']}) on {len(record['cases'])} "
          f"{args.split} case(s): {args.output}/conformal.json")
    for row in record["targets"]:
        print(f"  {row['name']}: {row['guarantee']}")
    return 0


def run_apply(args: argparse.Namespace) -> int:
    from segcalib.utils.files import remove_stale_temporaries
    from segcalib.utils.locks import folder_lock

    with folder_lock(args.output, command=f"conformal apply --output {args.output}"):
        from segcalib.conformal import apply_conformal

        summary = apply_conformal(args.conformal, args.predictions, args.output, format=args.format,
                                  channel_axis=args.channel_axis, input=args.input, progress=not args.quiet)
        remove_stale_temporaries(args.output)
    print(f"conformal masks of {len(summary['cases'])} case(s) ({', '.join(summary['channels'])}): {args.output}")
    return 0
