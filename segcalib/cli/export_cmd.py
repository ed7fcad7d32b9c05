"""``segcalib export --run RUN_DIR --manifest M [--split test] --output DIR [--temperature none|fit|VALUE]``."""

from __future__ import annotations

import argparse

from segcalib.cli._args import positive_mm
from segcalib.spatial.regions import ALL, DEFAULT_BOUNDARY_MM, available_regions


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write calibrated probability maps (NIfTI, the input's own geometry)",
        description="Sliding-window inference of a split, logits / T, softmax, back to each input's "
        "geometry: <case>_probs.nii.gz (class last), <case>_seg.nii.gz, optional <case>_uncertainty.nii.gz.",
    )
    p.add_argument("--run", required=True, help="run folder written by segcalib train")
    p.add_argument("--manifest", required=True, help="manifest with the cases to export")
    p.add_argument("--split", default="test", choices=("training", "validation", "test"))
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--temperature", default="none", help="none, fit (on the run's validation voxels) or a value T > 0")
    p.add_argument("--temperature-region", default=ALL, choices=available_regions(),
                   help="ground-truth voxels the temperature is fitted on (default: all)")
    p.add_argument("--boundary-mm", type=positive_mm, default=DEFAULT_BOUNDARY_MM,
                   help="half-width in mm of the boundary region a temperature is fitted on (default 2); "
                   "recorded in export.json, and evaluate uses the same band")
    p.add_argument("--checkpoint", default="best", help="best, last or a checkpoint path (default: best)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="probability map type")
    p.add_argument("--uncertainty", action="store_true", help="also write <case>_uncertainty.nii.gz (entropy)")
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda when available)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segcalib.errors import DataError
    from segcalib.inference.temperature import TemperatureRequest
    from segcalib.utils.files import remove_stale_temporaries
    from segcalib.utils.locks import folder_lock

    try:
        request = TemperatureRequest.parse(args.temperature, args.temperature_region)
    except ValueError as exc:
        raise DataError(f"--temperature: {exc}") from None
    with folder_lock(args.output, command=f"export --run {args.run} --output {args.output}"):
        from segcalib.export import ExportOptions, export

        result = export(
            args.run,
            args.manifest,
            args.output,
            ExportOptions(
                split=args.split,
                temperature=request,
                boundary_mm=args.boundary_mm,
                checkpoint=args.checkpoint,
                dtype=args.dtype,
                uncertainty=args.uncertainty,
                device=args.device,
            ),
        )
        remove_stale_temporaries(args.output)  # left by a killed run; this one completed the folder
    skipped = f", {len(result.skipped)} already complete" if result.skipped else ""
    print(f"exported {len(result.cases)} case(s){skipped} to {result.output} (T = {result.temperature:.4g})")
    return 0
