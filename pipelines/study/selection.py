"""The selection criterion (fixed before running) and the seed-noise rule.

Criterion. A candidate is (loss, calibrator, fit region), with calibrator ``none`` for the raw
network. For each seed, its out-of-fold scores on the protocol's cases (never a test case) are
divided by the same seed's CE+Dice uncalibrated scores; the candidate's score is the mean over
seeds of the mean of the four ratios NLL, ECE all, ECE foreground, ECE boundary (lower is better).
A candidate is admissible only if

- its mean foreground Dice is within ``dice_tolerance`` (0.3 point) of CE+Dice's, where Dice is the
  run's validation-split Dice plus the calibrator's out-of-fold Dice change (CE+Dice: validation
  Dice, uncalibrated), both means over seeds; and
- none of the four ratios (means over seeds) exceeds 1: no region, and not the NLL, may end up
  worse calibrated than uncalibrated CE+Dice -- a gain on one region cannot buy a loss on another.

The recommended recipe is the admissible candidate with the lowest score (over both regimes,
each normalised by its own regime's CE+Dice). While the grid is incomplete, candidates scored on
fewer seeds than the others of their regime are not recommended (no effect on the complete grid).

Seed noise. A difference between two recipes is read as larger than seed noise when the
differences paired by seed all have the same sign and their mean exceeds twice their sample
standard deviation in absolute value (with 3 seeds: t > 3.5, about p < 0.08 two-sided).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from pipelines.study.grid import BASELINE, NONE, Job

METRICS = ("nll", "ece_all", "ece_foreground", "ece_boundary")
NO_REGION = "-"


@dataclass(frozen=True, order=True)
class Candidate:
    regime: str
    loss: str
    calibrator: str
    region: str

    @property
    def label(self) -> str:
        if self.calibrator == NONE:
            return f"{self.loss}, no calibrator"
        return f"{self.loss} + {self.calibrator} fitted on {self.region}"


@dataclass
class Scored:
    """A candidate's criterion on the protocol's cases, with its per-seed values."""

    candidate: Candidate
    score: float
    score_std: float
    ratios: dict[str, float]
    dice: float
    dice_reference: float
    admissible: bool
    reason: str
    per_seed: dict[int, dict[str, float]] = field(default_factory=dict)


def candidate_values(results: Mapping[Job, dict[str, Any]], regime: str) -> dict[Candidate, dict[int, dict[str, float]]]:
    """Per candidate and seed: the four out-of-fold metrics and the Dice (validation + change)."""
    values: dict[Candidate, dict[int, dict[str, float]]] = {}
    for job, res in results.items():
        if job.regime != regime:
            continue
        val_dice = float(res["validation"]["dice_fg"])
        records = list(res["cv"].items())
        if not records:
            continue
        raw = records[0][1]["uncalibrated"]
        none = Candidate(regime, job.loss, NONE, NO_REGION)
        values.setdefault(none, {})[job.seed] = {**{m: raw[m]["mean"] for m in METRICS}, "dice": val_dice}
        for region, record in records:
            for name, row in record["table"].items():
                if "error" in row:
                    continue
                change = row.get("dice_change")
                change = 0.0 if change is None or not math.isfinite(change) else change
                cand = Candidate(regime, job.loss, name, region)
                values.setdefault(cand, {})[job.seed] = {**{m: row[m]["mean"] for m in METRICS}, "dice": val_dice + change}
    return values


def score_candidates(results: Mapping[Job, dict[str, Any]], regime: str, dice_tolerance: float = 0.003) -> list[Scored]:
    """Every candidate of ``regime`` scored by the criterion (best first); [] without a CE+Dice run."""
    values = candidate_values(results, regime)
    reference = values.get(Candidate(regime, BASELINE, NONE, NO_REGION))
    if not reference:
        return []
    scored = []
    for cand, seeds in values.items():
        common = sorted(set(seeds) & set(reference))
        per_seed = [{m: seeds[s][m] / reference[s][m] for m in METRICS} for s in common]
        per_seed_scores = [statistics.fmean(r.values()) for r in per_seed]
        ratios = {m: statistics.fmean(r[m] for r in per_seed) for m in METRICS}
        dice = statistics.fmean(seeds[s]["dice"] for s in common)
        dice_ref = statistics.fmean(reference[s]["dice"] for s in common)
        reasons = []
        if dice < dice_ref - dice_tolerance:
            reasons.append(f"Dice {100 * (dice - dice_ref):+.2f} pt")
        reasons += [f"{m} ×{ratios[m]:.2f}" for m in METRICS if not ratios[m] <= 1]
        std = statistics.stdev(per_seed_scores) if len(per_seed_scores) > 1 else 0.0
        scored.append(Scored(cand, statistics.fmean(per_seed_scores), std, ratios, dice, dice_ref, not reasons,
                             "; ".join(reasons), {s: seeds[s] for s in common}))
    return sorted(scored, key=lambda s: (not s.admissible, _finite(s.score), s.candidate))


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def best(scored: Sequence[Scored], loss: str | None = None) -> Scored | None:
    """The admissible candidate with the lowest score (of ``loss`` if given; otherwise the best
    inadmissible one, flagged by its ``admissible`` field); None when there is none at all."""
    pool = [s for s in scored if loss is None or s.candidate.loss == loss]
    return pool[0] if pool else None


def recommend(by_regime: Mapping[str, Sequence[Scored]]) -> Scored | None:
    """The recipe: the best admissible candidate over all regimes (or the best one, flagged). While
    the grid fills, a candidate scored on fewer seeds than others of its regime is passed over
    (one lucky seed would otherwise lead); on a complete grid every candidate has every seed."""
    firsts = []
    for scored in by_regime.values():
        if scored:
            most = max(len(s.per_seed) for s in scored)
            firsts.append(next(s for s in scored if len(s.per_seed) == most))
    if not firsts:
        return None
    return min(firsts, key=lambda s: (not s.admissible, _finite(s.score)))


@dataclass(frozen=True)
class Paired:
    """A difference A - B paired by seed."""

    mean: float
    std: float
    n: int
    beyond_noise: bool


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> Paired:
    """Mean and sample std of ``a[s] - b[s]`` over common seeds, and the seed-noise verdict."""
    diffs = [a[s] - b[s] for s in sorted(set(a) & set(b)) if math.isfinite(a[s]) and math.isfinite(b[s])]
    if not diffs:
        return Paired(math.nan, math.nan, 0, False)
    mean = statistics.fmean(diffs)
    std = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    beyond = len(diffs) > 1 and same_sign and abs(mean) > 2 * std
    return Paired(mean, std, len(diffs), beyond)


def results_from_records(records: Mapping[Job, dict[str, Any]]) -> dict[Job, dict[str, Any]]:
    """The units' records in the shape the criterion reads: validation and test summaries (raw maps)
    and the cross-validation tables per fit region."""
    return {job: {"validation": r["validation"][NONE], "test": r["test"][NONE]["summary"], "cv": r["cv"]}
            for job, r in records.items()}


def top_losses(records: Mapping[Job, dict[str, Any]], n: int, dice_tolerance: float = 0.003) -> list[str]:
    """The ``n`` short-regime losses other than CE+Dice whose best candidate scores lowest (admissible first)."""
    short = {job: r for job, r in records.items() if job.regime == "short"}
    order: list[str] = []
    for s in score_candidates(results_from_records(short), "short", dice_tolerance):
        if s.candidate.loss != BASELINE and s.candidate.loss not in order:
            order.append(s.candidate.loss)
    return order[:n]
