"""Which units to run next, in the fixed priority order, within a budget of minutes."""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from typing import Any, Collection, Sequence

from pipelines.study.grid import BASELINE, LONG_TOP, GridSettings, Job, must_have_short, priority_order
from pipelines.study.run import CVSettings, UnitPool
from pipelines.study.selection import top_losses
from pipelines.study.unit import load_records, run_unit, unit_seconds

log = logging.getLogger("segcalib.study")


def pending_units(
    args: argparse.Namespace, records: dict[Job, dict[str, Any]], running: Collection[Job] = ()
) -> list[Job]:
    """Units without a record, in priority order. The long regime comes last. Its CE+Dice units
    (CE+Dice is in the long regime whatever the short one shows), or every unit of the losses that
    ``--long-losses`` names, are queued as soon as every short unit has a record or is ``running``,
    so that no worker idles while the last short units finish. The short regime's top three are
    queued once the short regime has every record (the must-have units, and the other losses when
    this grid runs the short regime), since a top three read while a short unit is still running
    could change when that unit's record lands."""
    queue = priority_order(args.seeds, args.losses) if "short" in args.regimes else []
    if "long" in args.regimes:
        needed = [j for j in must_have_short(args.seeds) if j.loss in args.losses] + queue
        if all(j in records for j in needed):
            losses = args.long_losses or [BASELINE, *top_losses(records, LONG_TOP, args.dice_tolerance)]
            queue += [Job("long", loss, seed) for seed in args.seeds for loss in losses]
        elif all(j in records or j in running for j in needed):  # what does not wait for the top three
            queue += [Job("long", loss, seed) for seed in args.seeds for loss in args.long_losses or [BASELINE]]
    return [job for job in queue if job not in records]


def must_have_complete(records: dict[Job, dict[str, Any]], seeds: Sequence[int], dice_tolerance: float) -> bool:
    """Whether the study's must-have grid has every record: CE+Dice and the seed papers' losses in
    the short regime, then the long regime for CE+Dice and the short regime's top three."""
    if not all(j in records for j in must_have_short(seeds)):
        return False
    long_losses = [BASELINE, *top_losses(records, LONG_TOP, dice_tolerance)]
    return all(Job("long", loss, seed) in records for loss in long_losses for seed in seeds)


def expected_seconds(records: dict[Job, dict[str, Any]], device: str | None) -> float:
    """Median seconds of a finished unit on this kind of device (0 before the first)."""
    kind = "cuda" if device == "cuda" else "cpu"
    seen = [unit_seconds(r) for r in records.values() if str(r["ran"]["device"]).startswith(kind)]
    return statistics.median(seen) if seen else 0.0


def run_budget(args: argparse.Namespace, grid: GridSettings, cv: CVSettings) -> list[Job]:
    """Run pending units, ``args.jobs`` at a time (the next one starts as soon as one ends), while
    the minutes used plus a unit's expected time fit in ``args.budget_min`` (no limit when None);
    returns the units finished here."""
    started = time.time()
    budget = math.inf if args.budget_min is None else 60 * args.budget_min
    finished: list[Job] = []
    budget_said = False
    with UnitPool(run_unit, args.jobs) as pool:
        while True:
            records = load_records(args.records)
            expected = expected_seconds(records, args.device)
            queue: list[Job] = []
            while pool.free > 0:
                # read again after each start: a unit that starts may let others queue (the long regime)
                queue = [job for job in pending_units(args, records, pool.running) if job not in pool.running]
                if not queue:
                    break
                used = time.time() - started
                if used + expected > budget:
                    if not budget_said:  # once: later units ending would repeat it
                        log.info("budget: %.1f of %.1f min used, a unit takes about %.1f min: not starting %s",
                                 used / 60, budget / 60, expected / 60, queue[0].folder)
                        budget_said = True
                    queue = []
                    break
                job = queue[0]
                pool.start(job, (job, grid, cv, args.records, args.hardware))
            ended = pool.wait_any()
            finished += ended
            if not ended and not pool.running:
                if not queue and not pending_units(args, load_records(args.records)):
                    log.info("no unit left to run in this grid")
                break
    return finished
