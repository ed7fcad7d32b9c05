"""``segcalib report RUN_OR_REPORT ... --output DIR``: compare several runs/reports."""

from __future__ import annotations

import argparse


HELP = "compare several runs or reports (table + overlaid reliability diagrams)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help=HELP,
        description="Each input is a report.json, or a folder searched for report.json files.",
    )
    p.add_argument("inputs", nargs="+", metavar="RUN_OR_REPORT")
    p.add_argument("--output", required=True, help="folder for comparison.html/.json/.md")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segcalib.reports import compare
    from segcalib.utils.files import remove_stale_temporaries
    from segcalib.utils.locks import folder_lock

    with folder_lock(args.output, command=f"report --output {args.output}", what="--output"):
        result = compare(args.inputs, args.output)
        remove_stale_temporaries(args.output)  # left by a killed run; this one completed the folder
    print(f"compared {len(result['reports'])} report(s): {args.output}/comparison.html")
    return 0
