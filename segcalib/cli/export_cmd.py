"""``segcalib export --run RUN_DIR [--run RUN_DIR2 ...] --manifest M [--split test] --output DIR
[--temperature none|fit|VALUE | --calibrator CAL_DIR] [--tta flips] [--mc-dropout N]``."""

from __future__ import annotations

import argparse

from segcalib.cli._args import LazyChoices, positive_mm, region_names

HELP = "write calibrated probability maps (NIfTI, the input's own geometry)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help=HELP,
        description="Sliding-window inference of a split, post-hoc calibration (a temperature or a calibrator), "
        "back to each input's geometry: <case>_probs.nii.gz (class last), <case>_seg.nii.gz, optional "
        "<case>_uncertainty.nii.gz. Several --run, --tta and --mc-dropout make an ensemble, averaged in "
        "probability space after each member's calibration, with <case>_entropy, _mutual_info and "
        "_expected_entropy maps.",
    )
    p.add_argument("--run", required=True, action="append",
                   help="run folder written by segcalib train; give it several times for an ensemble")
    p.add_argument("--manifest", required=True, help="manifest with the cases to export")
    p.add_argument("--split", default="test", choices=("training", "validation", "test"))
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--temperature", default="none", help="none, fit (on the run's validation voxels) or a value T > 0")
    p.add_argument("--temperature-region", default=None, choices=LazyChoices(region_names), metavar="REGION",
                   help="ground-truth voxels the temperature is fitted on: %(choices)s (default: all)")
    p.add_argument("--boundary-mm", type=positive_mm, default=None,
                   help="half-width in mm of the boundary region a temperature is fitted on (default 2); "
                   "recorded in export.json, and evaluate uses the same band")
    p.add_argument("--calibrator", default=None,
                   help="a folder written by segcalib calibrate fit, applied to each member instead of a temperature")
    p.add_argument("--tta", default=None, choices=("flips",),
                   help="test-time augmentation: every flip of the axes the model was trained to be invariant to")
    p.add_argument("--tta-axes", type=int, nargs="+", default=None, metavar="AXIS",
                   help="test-time augmentation: every flip of these spatial axes instead")
    p.add_argument("--mc-dropout", type=int, default=0, metavar="N",
                   help="N Monte-Carlo dropout passes per member (the model needs dropout)")
    p.add_argument("--variance", action="store_true", help="ensembles: also write <case>_variance.nii.gz (per class)")
    p.add_argument("--logits", action="store_true",
                   help="also write <case>_logits.nii.gz (one model), for segcalib calibrate fit")
    p.add_argument("--checkpoint", default="best", help="best, last or a checkpoint path (default: best)")
    p.add_argument("--allow-foreign-checkpoint", action="store_true",
                   help="accept a --checkpoint of another config than the run's and export it with the config it "
                   "carries (recorded in export.json)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="probability map type")
    p.add_argument("--uncertainty", action="store_true", help="also write <case>_uncertainty.nii.gz (entropy)")
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda when available)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segcalib.errors import DataError
    from segcalib.inference.temperature import TemperatureRequest
    from segcalib.utils.files import remove_stale_temporaries
    from segcalib.spatial.regions import ALL, DEFAULT_BOUNDARY_MM
    from segcalib.utils.locks import folder_lock

    boundary_mm = DEFAULT_BOUNDARY_MM if args.boundary_mm is None else args.boundary_mm
    try:
        request = TemperatureRequest.parse(args.temperature, args.temperature_region or ALL)
    except ValueError as exc:
        raise DataError(f"--temperature: {exc}") from None
    if args.calibrator is not None and request.mode != "none":
        raise DataError("--calibrator and --temperature are two post-hoc steps: give one")
    if args.tta and args.tta_axes:
        raise DataError("--tta flips and --tta-axes: give one")
    if args.mc_dropout < 0:
        raise DataError(f"--mc-dropout: {args.mc_dropout} must be >= 0")
    runs = " ".join(f"--run {r}" for r in args.run)
    with folder_lock(args.output, command=f"export {runs} --output {args.output}", what="--output"):
        from segcalib.export import ExportOptions, export

        result = export(
            args.run,
            args.manifest,
            args.output,
            ExportOptions(
                split=args.split,
                temperature=request,
                calibrator=args.calibrator,
                tta=args.tta or args.tta_axes,
                mc_dropout=args.mc_dropout,
                variance=args.variance,
                logits=args.logits,
                boundary_mm=boundary_mm,
                checkpoint=args.checkpoint,
                dtype=args.dtype,
                uncertainty=args.uncertainty,
                device=args.device,
                allow_foreign_checkpoint=args.allow_foreign_checkpoint,
            ),
        )
        remove_stale_temporaries(args.output)  # left by a killed run; this one completed the folder
    skipped = f", {len(result.skipped)} already complete" if result.skipped else ""
    post = f"T = {result.temperature:.4g}" if result.temperature is not None else f"calibrator {args.calibrator}"
    print(f"exported {len(result.cases)} case(s){skipped} to {result.output} ({post})")
    return 0
