"""Calibration study v2: which loss and which post-hoc calibrator to use, chosen without test leakage.

Axes: losses (``configs/hippocampus/*.yaml``) × seeds × regimes (``short``: the recipe's cosine
schedule; ``long``: ``--long-factor`` times the epochs at a constant learning rate, where CE turns
over-confident) × post-hoc calibrators (every ``segcalib calibrate`` method that ``auto`` offers,
each fitted on the ``all``, ``foreground`` or ``boundary`` ground-truth region, plus none).

Protocol, fixed before running (see :mod:`pipelines.study.cases` and :mod:`pipelines.study.selection`):

1. Each run is trained (seeded), and its splits are exported with logits at T = 1.
2. Every calibrator × fit region is scored out of fold by k-fold cross-validation over cases of the
   protocol: by default ``validation`` (the 16 validation cases, k = 4), because the alternative,
   ``nontest`` (the 100 training + validation cases, k = 5), scores calibrators on the network's own
   training cases, where it is over-confident in a way it is not on unseen cases. The 20 test
   cases never enter a fold.
3. Criterion: per seed, the mean of NLL, ECE all, ECE foreground and ECE boundary, each divided by
   uncalibrated CE+Dice's value (same seed), averaged over seeds; admissible only if the mean
   foreground Dice is within 0.3 point of CE+Dice's and none of the four ratios exceeds 1 (no region
   worse than the baseline, so a gain on one region cannot pay for a loss on another). The lowest
   admissible score is the recipe.
4. Each seed's chosen calibrator is refitted on all the protocol's cases and applied to its test
   maps; test numbers are mean ± std over seeds; a difference beats seed noise when the per-seed
   differences share a sign and |mean| > 2 std. The recipe's seeds, each calibrated, are averaged
   into an ensemble row.

Resumable: finished runs, exports, cross-validations, calibrators and reports are reused.
``--smoke`` runs the whole pipeline on the 6 smoke cases (2 losses, 2 seeds, 2 calibrators, 2 fit
regions, 2 folds over the 5 non-test cases) in under 3 minutes on 2 CPU cores. The full grid
(3 seeds of 14 losses short, of 10 long: 72 runs) is for a GPU machine::

    python pipelines/calibration_study.py --jobs 8 --device cuda --hardware "1 GPU, 16 CPU cores"

On CPU the cross-validation dominates: on the 5 smoke cases (k = 2, all voxels, 2 busy cores)
boundary_temperature took 215 s, dirichlet 199 s, class_temperature 27 s; with ``--device cuda``
the cases are streamed to the GPU and the calibrators fit there.

``--jobs N`` trains and evaluates N runs at once in spawned processes (torch threads shared out
among them); the choice and the tables are made once every run is done.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segcalib.calibrators.selection import candidate_names  # noqa: E402
from segcalib.data import load_manifest  # noqa: E402
from segcalib.spatial.regions import default_regions  # noqa: E402

from pipelines.study.cases import PROTOCOLS  # noqa: E402
from pipelines.study.ensemble import average_folders  # noqa: E402
from pipelines.study.grid import BASELINE, LONG_LOSSES, LOSSES, REGIMES, SMOKE_EPOCHS, SMOKE_OVERRIDES, GridSettings, make_jobs  # noqa: E402
from pipelines.study.run import CVSettings, calibrated_test, calibrated_test_folder, evaluate_once, manifest_of, prepare_run, run_all  # noqa: E402
from pipelines.study.selection import best, recommend, score_candidates  # noqa: E402
from pipelines.study.tables import StudyResults, write_results, write_what_to_use  # noqa: E402

log = logging.getLogger("segcalib.study")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="the smoke cases, tiny networks, 1 epoch, 2 losses, 2 seeds, 2 calibrators, 2 folds")
    parser.add_argument("--regimes", nargs="+", choices=REGIMES)
    parser.add_argument("--losses", nargs="+", choices=LOSSES)
    parser.add_argument("--long-losses", nargs="+", choices=LOSSES, help="losses trained in the long regime (default: study v1's ten)")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--calibrators", nargs="+", help="default: every method `segcalib calibrate --method auto` tries")
    parser.add_argument("--regions", nargs="+", choices=default_regions(), help="fit regions (default: all three; smoke: 2)")
    parser.add_argument("--protocol", choices=list(PROTOCOLS), help="cases for the calibrator fit and choice (default: validation)")
    parser.add_argument("--folds", type=int, help="default: 4 for validation, 5 for nontest")
    parser.add_argument("--max-voxels", type=int, default=2_000_000, help="bounded state of each fitted calibrator")
    parser.add_argument("--dice-tolerance", type=float, default=0.003, help="admissible Dice loss vs CE+Dice (fraction)")
    parser.add_argument("--long-factor", type=int, default=2)
    parser.add_argument("--epochs", type=int, help="the short regime's epochs (default: the config's)")
    parser.add_argument("--set", action="append", default=[], help="extra config override for every run")
    parser.add_argument("--jobs", type=int, default=1, help="independent runs in parallel processes")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="training, export and evaluation device")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--results", type=Path)
    parser.add_argument("--what-to-use", type=Path)
    parser.add_argument("--hardware", default=f"{platform.machine()}, {platform.processor() or 'CPU'}")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.regimes = args.regimes or (["short"] if smoke else list(REGIMES))
    args.losses = args.losses or (["ce", BASELINE] if smoke else list(LOSSES))
    args.long_losses = args.long_losses or list(LONG_LOSSES)
    args.seeds = args.seeds or ([0, 1] if smoke else [0, 1, 2])
    args.calibrators = args.calibrators or (["temperature", "vector"] if smoke else candidate_names())
    args.regions = args.regions or list(default_regions())[:: 2 if smoke else 1]
    args.protocol = args.protocol or ("nontest" if smoke else "validation")
    args.folds = args.folds or (2 if smoke else None)
    args.max_voxels = 20_000 if smoke and args.max_voxels == 2_000_000 else args.max_voxels
    args.epochs = args.epochs or (SMOKE_EPOCHS if smoke else None)
    args.set = (list(SMOKE_OVERRIDES) if smoke else []) + args.set
    args.out = args.out or REPO / "runs" / ("study_smoke" if smoke else "study")
    args.results = args.results or (args.out / "results.md" if smoke else REPO / "docs" / "results.md")
    args.what_to_use = args.what_to_use or args.results.with_name("what_to_use.md")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.time()
    grid = GridSettings(args.out, args.long_factor, args.epochs, tuple(args.set), args.device)
    cv = CVSettings(args.protocol, tuple(args.calibrators), tuple(args.regions), args.folds, 0, args.max_voxels)
    jobs = make_jobs(args.regimes, args.losses, args.long_losses, args.seeds)
    results = dict(zip(jobs, run_all(prepare_run, [(job, grid, cv) for job in jobs], args.jobs)))

    scored = {regime: score_candidates(results, regime, args.dice_tolerance) for regime in args.regimes}
    chosen = {(regime, loss): best(scored[regime], loss) for regime in args.regimes for loss in args.losses}
    chosen = {key: value for key, value in chosen.items() if value is not None}
    tasks = [(job, grid, cv, c.candidate.calibrator, c.candidate.region)
             for job in jobs for key, c in chosen.items() if key == (job.regime, job.loss)]
    calibrated = dict(zip([(t[0], t[3], t[4]) for t in tasks], run_all(calibrated_test, tasks, args.jobs)))

    recipe = recommend(scored)
    ensemble = None
    if recipe is not None:
        c = recipe.candidate
        members = [j for j in jobs if (j.regime, j.loss) == (c.regime, c.loss)]
        if len(members) > 1:
            folder = args.out / "ensembles" / f"{c.regime}_{c.loss}_{cv.tag}_{c.region}_{c.calibrator}"
            average_folders([calibrated_test_folder(j, grid, cv, c.calibrator, c.region) for j in members], folder)
            manifest, _ = manifest_of(members[0], grid)
            ensemble = evaluate_once(folder, manifest, folder / "report", "test", args.device)

    test_cases = len(load_manifest(*manifest_of(jobs[0], grid)).cases("test"))
    study = StudyResults(results, scored, chosen, calibrated, recipe, ensemble, args, time.time() - started, test_cases)
    write_results(study, args.results)
    write_what_to_use(study, args.what_to_use, args.results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.json").write_text(json.dumps(
        [{"job": job.__dict__, "results": res} for job, res in results.items()], indent=1, default=str))
    print(f"wrote {args.results} and {args.what_to_use}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
