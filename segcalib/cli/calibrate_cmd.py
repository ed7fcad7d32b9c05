"""``segcalib calibrate fit`` / ``segcalib calibrate apply``: post-hoc calibration of any model's maps."""

from __future__ import annotations

import argparse

from segcalib.cli._args import LazyChoices, prediction_folder_args, positive_mm, region_names

HELP = "fit / apply a post-hoc calibrator on any model's probability maps (segcalib, nnU-Net, NIfTI)"


def _methods() -> list[str]:
    from segcalib.calibrators import list_calibrators

    return ["auto", *list_calibrators()]


def _criteria() -> tuple[str, ...]:
    from segcalib.calibrators.criteria import CRITERIA

    return CRITERIA


def _preserve() -> tuple[str, ...]:
    from segcalib.calibrators.criteria import PRESERVE

    return PRESERVE


def add_parser(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser(
        "calibrate",
        help=HELP,
        description="Calibrate the maps of any segmentation model: fit on a labelled split (one method, or "
        "'auto': chosen by cross-validation over cases), then apply to other maps.",
    )
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    def folder_args(q: argparse.ArgumentParser) -> None:
        prediction_folder_args(q)
        q.add_argument("--device", default=None, help="cuda, cpu (default: cuda when available)")

    fit = verbs.add_parser("fit", help="fit a calibrator on a labelled split; writes CAL_DIR/calibrator.json")
    folder_args(fit)
    fit.add_argument("--manifest", required=True, help="manifest with the ground truth")
    fit.add_argument("--split", default=None, choices=("training", "validation", "test", "folds"),
                     help="the labelled cases to fit on (default: validation; for an nnU-Net trainer folder, 'folds': "
                          "every labelled case with a fold's validation map, whatever its split)")
    fit.add_argument("--method", default="auto", choices=LazyChoices(_methods), metavar="METHOD",
                     help="a registered calibrator, or auto: chosen by k-fold cross-validation over cases (default)")
    fit.add_argument("--output", required=True, help="calibrator folder (CAL_DIR)")
    fit.add_argument("--region", default=None, choices=LazyChoices(region_names), metavar="REGION",
                     help="ground-truth voxels the calibrator is fitted on (default: all)")
    fit.add_argument("--preserve", default="none", choices=LazyChoices(_preserve), metavar="PRESERVE",
                     help="auto: none (default), argmax or order: only calibrators that keep the argmax / the class order")
    fit.add_argument("--folds", type=int, default=5, help="auto: folds of the cross-validation over cases")
    fit.add_argument("--criterion", default=None, choices=LazyChoices(_criteria), metavar="CRITERION",
                     help="auto: held-out criterion, balanced (default: NLL and the ECE of all voxels, foreground "
                     "and boundary relative to the uncalibrated maps, none of them worse), nll or ece_<region>")
    fit.add_argument("--fit-voxels", type=int, default=None,
                     help="auto: voxels each fold's calibrator is fitted on (default 200,000); held-out folds are "
                     "scored on all their voxels, the chosen method is refitted on --max-voxels")
    fit.add_argument("--boundary-mm", type=positive_mm, default=None,
                     help="half-width in mm of the boundary region (default 2)")
    fit.add_argument("--max-voxels", type=int, default=None, help="bound of the voxel sample (default 2,000,000)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--quiet", action="store_true", help="auto: no progress bar, per-method seconds or CV table")
    fit.add_argument("--use-image", action="store_true", help="lts: feed the image (from the manifest) too")
    fit.add_argument("--split-seed", type=int, default=None,
                     help="seed of the split made when the manifest has no validation/test lists")
    fit.set_defaults(func=run_fit)

    apply = verbs.add_parser("apply", help="calibrated maps (the files of segcalib export) of a prediction folder")
    folder_args(apply)
    apply.add_argument("--calibrator", required=True, help="folder written by calibrate fit")
    apply.add_argument("--output", required=True, help="output folder")
    apply.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="probability map type")
    apply.add_argument("--uncertainty", action="store_true", help="also write <case>_uncertainty.nii.gz (entropy)")
    apply.add_argument("--manifest", default=None, help="only for calibrators that read the image")
    apply.set_defaults(func=run_apply)


def _folder_options(args: argparse.Namespace):
    from segcalib.export.posthoc import FolderOptions

    return FolderOptions(format=args.format, channel_axis=args.channel_axis, input=args.input)


def run_fit(args: argparse.Namespace) -> int:
    from segcalib.utils.locks import folder_lock

    with folder_lock(args.output, command=f"calibrate fit --output {args.output}"):
        from segcalib.export.posthoc import FitOptions, fit_on_predictions
        from segcalib.utils.distributed import init_from_env, shutdown

        init_from_env()
        try:
            record = fit_on_predictions(
                args.predictions, args.manifest, args.output,
                FitOptions(split=args.split, method=args.method, preserve=args.preserve, folds=args.folds,
                           **{k: v for k, v in (("region", args.region), ("boundary_mm", args.boundary_mm),
                                                ("criterion", args.criterion), ("fit_voxels", args.fit_voxels))
                              if v is not None},
                           max_voxels=args.max_voxels, seed=args.seed, use_image=args.use_image, progress=not args.quiet,
                           split_seed=args.split_seed, device=args.device, folder=_folder_options(args)),
            )
        finally:
            shutdown()
    if record:
        chosen = (record.get("selection") or {}).get("selected")
        criterion = (record.get("selection") or {}).get("criterion")
        how = f" (chosen by {args.folds}-fold cross-validation on {criterion})" if chosen else ""
        how += f" in {record.get('seconds', 0):.1f} s"
        print(f"calibrator {record['method']}{how} fitted on {len(record.get('cases', []))} {record.get('split')} case(s), "
              f"region {record.get('fit_region')}: {args.output}/calibrator.json")
    return 0


def run_apply(args: argparse.Namespace) -> int:
    from segcalib.utils.files import remove_stale_temporaries
    from segcalib.utils.locks import folder_lock

    with folder_lock(args.output, command=f"calibrate apply --output {args.output}"):
        from segcalib.export.posthoc import apply_to_predictions
        from segcalib.utils.distributed import init_from_env, is_main_process, shutdown

        init_from_env()
        try:
            record = apply_to_predictions(
                args.calibrator, args.predictions, args.output, dtype=args.dtype, uncertainty=args.uncertainty,
                manifest_path=args.manifest, folder_options=_folder_options(args), device=args.device,
            )
            main_process = is_main_process()
        finally:
            shutdown()
        if main_process:
            remove_stale_temporaries(args.output)
    if main_process:
        print(f"calibrated {len(record.get('cases', []))} case(s) with {record['calibrator']['method']}: {args.output}")
    return 0
