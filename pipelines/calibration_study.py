"""Calibration study v3: which loss and which post-hoc calibrator to use, chosen without test leakage,
produced unit by unit on whatever machine is at hand.

Axes: losses (``configs/hippocampus/*.yaml``) × seeds × regimes (``short``: the recipe's cosine
schedule; ``long``: ``--long-factor`` times the epochs at a constant learning rate, where CE turns
over-confident) × post-hoc calibrators (every ``segcalib calibrate`` method that ``auto`` offers,
each fitted on the ``all``, ``foreground`` or ``boundary`` ground-truth region, plus none).

A unit is one (regime, loss, seed) run taken all the way (:mod:`pipelines.study.unit`): train →
export → cross-validate every calibrator × fit region → refit → score every candidate on the test
cases → one compact record ``docs/results/study/<regime>/<loss>/seed<k>.json``, committed. Units
run in a fixed priority order (:func:`pipelines.study.grid.priority_order`): CE+Dice's seeds 0-2,
the seed papers' losses seed by seed, the other losses, then the long regime for CE+Dice and the
short regime's top three losses by the criterion (chosen once the must-have short units are done).
``--budget-min M`` starts units while the minutes used plus the median unit time seen so far fit in
M; a finished unit is never redone, a killed one leaves no record and is redone. ``--tables-only``
rebuilds ``docs/results.md``, ``docs/what_to_use.md`` and ``docs/results/recipe.yaml`` (the recipe ``segcalib
demo`` trains and calibrates with) from the records alone, on any machine.

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
4. Each seed's chosen calibrator was refitted on all the protocol's cases and scored once on its
   test maps (in the unit's record); test numbers are mean ± std over seeds; a difference beats seed
   noise when the per-seed differences share a sign and |mean| > 2 std.

Run in the background at low priority while working on something else::

    nice -n 19 python pipelines/calibration_study.py --budget-min 120 --threads 1

and on a lent GPU, in one prepared call of at most 9 minutes::

    python pipelines/calibration_study.py --budget-min 8 --device cuda --jobs 8 --hardware "1x H200"

``--smoke`` runs the same pipeline on the 6 smoke cases (2 losses, 2 seeds, 2 calibrators, 2 fit
regions, 2 folds over the 5 non-test cases), its records under ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segcalib.calibrators.selection import candidate_names  # noqa: E402
from segcalib.spatial.regions import default_regions  # noqa: E402

from pipelines.study.budget import must_have_complete, run_budget  # noqa: E402
from pipelines.study.cases import PROTOCOLS  # noqa: E402
from pipelines.study.grid import BASELINE, LOSSES, REGIMES, SMOKE_EPOCHS, SMOKE_OVERRIDES, GridSettings  # noqa: E402
from pipelines.study.run import CVSettings  # noqa: E402
from pipelines.study.tables import study_from_records, write_recipe, write_results, write_what_to_use  # noqa: E402
from pipelines.study.unit import RECORDS, load_records  # noqa: E402

log = logging.getLogger("segcalib.study")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="the smoke cases, tiny networks, 1 epoch, 2 losses, 2 seeds, 2 calibrators, 2 folds")
    parser.add_argument("--regimes", nargs="+", choices=REGIMES)
    parser.add_argument("--losses", nargs="+", choices=LOSSES)
    parser.add_argument("--long-losses", nargs="+", choices=LOSSES,
                        help="losses of the long regime (default: CE+Dice and the short regime's top three by the criterion)")
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
    parser.add_argument("--budget-min", type=float, help="start units while they fit in this many minutes (default: no limit)")
    parser.add_argument("--tables-only", action="store_true", help="rebuild the tables from the committed records alone")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 when running in the background)")
    parser.add_argument("--records", type=Path, help="unit records (default: docs/results/study; smoke: OUT/records)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--results", type=Path)
    parser.add_argument("--what-to-use", type=Path)
    parser.add_argument("--recipe", type=Path, help="the recipe `segcalib demo` uses (default: docs/results/recipe.yaml with "
                        "the default --results, otherwise recipe.yaml beside --results)")
    parser.add_argument("--hardware", default=f"{platform.machine()}, {platform.processor() or 'CPU'}")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.regimes = args.regimes or (["short"] if smoke else list(REGIMES))
    args.losses = args.losses or (["ce", BASELINE] if smoke else list(LOSSES))
    args.seeds = args.seeds or ([0, 1] if smoke else [0, 1, 2])
    args.calibrators = args.calibrators or (["temperature", "vector"] if smoke else candidate_names())
    args.regions = args.regions or list(default_regions())[:: 2 if smoke else 1]
    args.protocol = args.protocol or ("nontest" if smoke else "validation")
    args.folds = args.folds or (2 if smoke else None)
    args.max_voxels = 20_000 if smoke and args.max_voxels == 2_000_000 else args.max_voxels
    args.epochs = args.epochs or (SMOKE_EPOCHS if smoke else None)
    args.set = (list(SMOKE_OVERRIDES) if smoke else []) + args.set
    args.out = args.out or REPO / "runs" / ("study_smoke" if smoke else "study")
    args.records = args.records or (args.out / "records" if smoke else RECORDS)
    default_results = REPO / "docs" / "results.md"
    args.results = args.results or (args.out / "results.md" if smoke else default_results)
    args.what_to_use = args.what_to_use or args.results.with_name("what_to_use.md")
    args.recipe = args.recipe or (REPO / "docs" / "results" / "recipe.yaml" if args.results == default_results
                                  else args.results.with_name("recipe.yaml"))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.tables_only:
        grid = GridSettings(args.out, args.long_factor, args.epochs, tuple(args.set), args.device)
        cv = CVSettings(args.protocol, tuple(args.calibrators), tuple(args.regions), args.folds, 0, args.max_voxels)
        done = run_budget(args, grid, cv)
        print(f"{len(done)} unit(s) finished in this invocation; records in {args.records}")
    records = load_records(args.records)
    study = study_from_records(records, args)
    if study is None:
        print(f"no CE+Dice record in {args.records} yet: tables not written")
        return 0
    write_results(study, args.results)
    write_what_to_use(study, args.what_to_use, args.results)
    write_recipe(study, args.recipe, must_have_complete(records, args.seeds, args.dice_tolerance))
    print(f"wrote {args.results}, {args.what_to_use} and {args.recipe} from {len(records)} record(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
