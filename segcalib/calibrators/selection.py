"""``--method auto``: choose a calibrator by k-fold cross-validation over cases, streamed.

Folds split the *cases* (a fold never splits a case, nor a group of cases such as one patient's scans:
:func:`~segcalib.calibrators.folds.assign_folds`). The cases are read through a
callable that yields ``(case_id, logits (1, C, *S), target (1, *S), spacing, image | None)`` one case
at a time, twice in all:

1. every case updates, for every candidate, the calibrator of its own fold (each keeping a bounded
   state of ``max_voxels / (k - 1)`` voxels, so that the k - 1 folds merged for the final refit hold
   ``max_voxels``); the calibrator of fold f is then fitted on the *merge* of the other folds' states,
   bounded to ``fit_voxels`` (default 200,000: the largest keys of the merged reservoirs, itself a
   stratified random sample), and kept only as its fitted parameters. A model of at most C^2 + C
   parameters is estimated at 200 k voxels far more precisely than the held-out differences being
   ranked, and fitting it is ten times cheaper than on 2 M;
2. every case is transformed by each candidate's calibrator of its own fold -- never trained on it --
   and scored: held-out NLL (all voxels) and ECE of the ``all``, ``foreground`` and ``boundary``
   ground-truth regions (15 bins, SPEC §3), the argmax flip rate and the pooled Dice change against
   the uncalibrated argmax (so flip rate and Dice change are cross-validated too).

Memory holds one case plus each candidate's k bounded states. The table gives per method and
metric the mean and sample standard deviation over folds (plus each fold's value) and the seconds
the method took (updates, fits and held-out transforms); the winner is chosen by
:mod:`~segcalib.calibrators.criteria` (default ``balanced``: NLL and the three regions' ECE relative to
the uncalibrated maps, no region worse) and refitted on all cases -- the merge of its k fold states,
which needs no third pass. ``preserve``
keeps only candidates that preserve the argmax (``argmax``) or the class order (``order``). A candidate
that fails on the data (DataError / ValueError in update, fit or transform, e.g. LTS with ``use_image``
and no image) drops out; its table row is ``{"error": reason}``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from segcalib.calibrators._heldout import REGIONS, HeldOutScores
from segcalib.calibrators.base import Calibrator
from segcalib.calibrators.criteria import BALANCED, CRITERIA, CV_FIT_VOXELS, PRESERVE, REGION_METRICS, choose
from segcalib.calibrators.folds import assign_folds
from segcalib.calibrators.registry import build_calibrator, calibrator_class, list_calibrators
from segcalib.errors import ConfigError, DataError
from segcalib.inference.temperature import DEFAULT_MAX_VOXELS
from segcalib.spatial import RegionContext, available_regions, region_mask
from segcalib.spatial.regions import ALL
from segcalib.utils.progress import progress_bar
from segcalib.utils.threads import cpu_threads
from segcalib.utils.tensors import as_label_map

log = logging.getLogger("segcalib")

CaseItem = tuple[str, Tensor, Tensor, "Sequence[float] | None", "Tensor | None"]
CaseSource = Callable[[], Iterable[CaseItem]]
Builder = Callable[[int], Calibrator]  # max_voxels -> an unfitted calibrator

METRICS = (*REGION_METRICS, "flip_rate", "dice_change")
DEFAULT_EXCLUDED = ("lts",)  # a trained network per fold: offered only when named


@dataclass
class CrossValidation:
    """What :func:`cross_validate` measured, and the per-fold states to refit any candidate."""

    folds: dict[str, int]
    table: dict[str, dict[str, Any]]
    uncalibrated: dict[str, Any]
    states: dict[str, list[Calibrator]] = field(repr=False)
    builders: Mapping[str, Builder] = field(repr=False)
    max_voxels: int = DEFAULT_MAX_VOXELS

    def refit(self, name: str) -> Calibrator:
        """Candidate ``name`` fitted on every case (the merge of its fold states)."""
        calibrator = self.builders[name](self.max_voxels)
        for state in self.states[name]:
            calibrator.merge(state)
        return calibrator.fit()


def cross_validate(
    cases: CaseSource,
    case_ids: Sequence[str],
    builders: Mapping[str, Builder],
    num_classes: int,
    *,
    folds: int = 5,
    seed: int = 0,
    fit_region: str = ALL,
    boundary_mm: float = 2.0,
    n_bins: int = 15,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    fit_voxels: int = CV_FIT_VOXELS,
    groups: Mapping[str, str | None] | None = None,
    progress: bool = False,
) -> CrossValidation:
    """Held-out scores of every candidate in ``builders`` by k-fold cross-validation over cases.

    Args:
        cases: called once per pass; yields ``(case_id, logits (1, C, *S), target (1, *S), spacing
            (mm per axis) or None, image (1, Cin, *S) or None)``, every id of ``case_ids`` once.
        case_ids: the ids the source yields (folds are dealt from them).
        builders: name -> function making an unfitted calibrator for a given ``max_voxels``.
        num_classes: C.
        folds: k (at most the number of cases).
        seed: seed of the fold assignment.
        fit_region: the ground-truth region the calibrators are fitted on.
        boundary_mm: half-width of the ``boundary`` region in mm.
        n_bins: ECE bins.
        max_voxels: bounded state of the final refit (the k fold states merged).
        fit_voxels: bounded sample each fold's calibrator is fitted on (at most ``max_voxels``).
        groups: case id -> group (e.g. patient); no group is split across folds.
        progress: show a progress bar over the passes and the (method, fold) fits, and log each
            method's seconds.

    Raises:
        DataError: a yielded id is unknown, repeated within a pass or missing.
    """
    with cpu_threads():
        return _cross_validate(cases, case_ids, builders, num_classes, folds, seed, fit_region, boundary_mm, n_bins,
                               max_voxels, fit_voxels, groups, progress)


def _cross_validate(
    cases: CaseSource, case_ids: Sequence[str], builders: Mapping[str, Builder], num_classes: int, folds: int,
    seed: int, fit_region: str, boundary_mm: float, n_bins: int, max_voxels: int, fit_voxels: int,
    groups: Mapping[str, str | None] | None, progress: bool,
) -> CrossValidation:
    if fit_region not in available_regions():
        raise ConfigError(f"fit_region must be one of {', '.join(available_regions())}, got {fit_region!r}")
    if isinstance(fit_voxels, bool) or not isinstance(fit_voxels, int) or fit_voxels < num_classes:
        raise ConfigError(f"fit_voxels must be an integer >= num_classes ({num_classes}), got {fit_voxels!r}")
    fold_of = assign_folds(case_ids, folds, seed, groups)
    k = max(fold_of.values()) + 1
    per_fold = max(num_classes, max_voxels // (k - 1))
    states = {name: [build(per_fold) for _ in range(k)] for name, build in builders.items()}
    seconds = dict.fromkeys(builders, 0.0)
    errors: dict[str, str] = {}  # a candidate that fails (e.g. needs an image) drops out, named in the table
    bar = progress_bar(2 * len(case_ids) + k * len(builders), "auto: cross-validation", progress)
    for case_id, logits, target, spacing, image in _stream(cases, fold_of, num_classes):
        mask = ground_truth_masks(target, spacing, num_classes, boundary_mm, (fit_region,))[fit_region]
        for name in builders:
            if name not in errors:
                started = time.perf_counter()
                try:
                    states[name][fold_of[case_id]].update(logits, target, mask, spacing=[spacing], image=image)
                except (DataError, ValueError) as exc:
                    errors[name] = f"case '{case_id}': {type(exc).__name__}: {exc}"
                seconds[name] += time.perf_counter() - started
        bar.update()
    if builders and len(errors) == len(builders):
        bar.close()
        reasons = "; ".join(f"{name}: {message}" for name, message in errors.items())
        raise DataError(f"every candidate calibrator failed on the cases: {reasons}")

    fitted: dict[str, list[Calibrator]] = {}
    for name, build in builders.items():
        if name in errors:
            bar.update(k)
            continue
        started = time.perf_counter()
        try:
            fitted[name] = []
            for f in range(k):
                bar.set_description(f"auto: fitting {name}, fold {f + 1}/{k}")
                fitted[name].append(_fit_without(build(min(fit_voxels, max_voxels)), states[name], f))
                bar.update()
        except (DataError, ValueError, RuntimeError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            del fitted[name]
            bar.update(k - f - 1)
        seconds[name] += time.perf_counter() - started
    bar.set_description("auto: scoring held-out cases")

    scores = {name: [HeldOutScores(num_classes, n_bins) for _ in range(k)] for name in fitted}
    reference = [HeldOutScores(num_classes, n_bins) for _ in range(k)]
    for case_id, logits, target, spacing, image in _stream(cases, fold_of, num_classes):
        f = fold_of[case_id]
        regions = ground_truth_masks(target, spacing, num_classes, boundary_mm, REGIONS)
        raw = torch.softmax(logits.detach().float(), dim=1)
        before = raw.argmax(dim=1)
        reference[f].update(raw, target, regions, regions[ALL], before)
        del raw
        for name, calibrators in list(fitted.items()):
            started = time.perf_counter()
            try:
                probs = calibrators[f].transform(logits, spacing=[spacing], image=image)
            except (DataError, ValueError) as exc:
                errors[name] = f"case '{case_id}': {type(exc).__name__}: {exc}"
                del fitted[name]
                continue
            seconds[name] += time.perf_counter() - started
            scores[name][f].update(probs, target, regions, regions[ALL], before)
            del probs
        bar.update()
    bar.close()
    if progress:
        log.info("auto: seconds per method (updates, %d fold fits, held-out transforms): %s", k,
                 ", ".join(f"{name} {seconds[name]:.1f}" for name in builders))

    table = {name: {**_summary(scores[name]), "seconds": round(seconds[name], 3)} for name in fitted}
    table.update({name: {"error": message, "seconds": round(seconds[name], 3)} for name, message in errors.items()})
    return CrossValidation(fold_of, table, _summary(reference), states, builders, max_voxels)


def _stream(cases: CaseSource, fold_of: Mapping[str, int], num_classes: int) -> Iterable[CaseItem]:
    """One pass over the cases, checked: shapes, and every id of ``fold_of`` exactly once."""
    seen: set[str] = set()
    for item in cases():
        if len(item) != 5:
            raise DataError(
                f"a case source must yield (case_id, logits, target, spacing, image), got {len(item)} items"
            )
        case_id, logits, target, spacing, image = item
        if case_id not in fold_of:
            raise DataError(f"case '{case_id}' was yielded but is not among the case ids")
        if case_id in seen:
            raise DataError(f"case '{case_id}' was yielded twice in one pass")
        seen.add(case_id)
        if logits.dim() < 4 or logits.shape[0] != 1 or logits.shape[1] != num_classes:
            raise DataError(f"case '{case_id}': logits must be (1, {num_classes}, *spatial), got {tuple(logits.shape)}")
        try:
            target = as_label_map(target, logits)
        except ValueError as exc:
            raise DataError(f"case '{case_id}': {exc}") from None
        yield case_id, logits, target, spacing, image
    missing = sorted(set(fold_of) - seen)
    if missing:
        raise DataError(f"{len(missing)} case(s) were not yielded by the case source: {', '.join(missing[:5])}")


def ground_truth_masks(
    target: Tensor, spacing: Any, num_classes: int, boundary_mm: float, names: Sequence[str]
) -> dict[str, Tensor]:
    """Boolean ``(1, *S)`` ground-truth region masks, restricted to labels in ``0..C-1`` (so an
    ignore label, which lies above every class, is in none; the regions see its voxels as
    background)."""
    valid = (target >= 0) & (target < num_classes)
    sp = [tuple(float(s) for s in spacing)] if spacing is not None else [(1.0,) * (target.dim() - 1)]
    safe = torch.where(valid, target, torch.zeros_like(target))
    context = RegionContext(target=safe, spacing=sp, num_classes=num_classes, boundary_mm=boundary_mm)
    out = {}
    for name in names:
        mask = region_mask(name, context)
        out[name] = valid if mask is None else mask & valid
    return out


def _fit_without(calibrator: Calibrator, states: list[Calibrator], fold: int) -> Calibrator:
    """``calibrator`` fitted on the merge of every state but ``fold``'s, kept as parameters only."""
    for g, state in enumerate(states):
        if g != fold:
            calibrator.merge(state)
    calibrator.fit()
    compact = type(calibrator).from_params(calibrator.num_classes, calibrator.get_params(), calibrator.tensors())
    return compact


def _summary(scores: list[HeldOutScores]) -> dict[str, Any]:
    """Per metric: mean and sample std over the folds where it is defined, and each fold's value.

    ``flip_rate`` and ``dice_change`` are pooled over all held-out cases (every case once).
    """
    per_fold = [s.compute() for s in scores]
    row: dict[str, Any] = {}
    for metric in REGION_METRICS:
        values = [v[metric] for v in per_fold]
        finite = [v for v in values if math.isfinite(v)]
        mean = sum(finite) / len(finite) if finite else math.nan
        if len(finite) > 1:
            std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))
        else:
            std = 0.0 if finite else math.nan
        row[metric] = {"mean": mean, "std": std, "folds": values}
    pooled = HeldOutScores(scores[0].num_classes, scores[0].n_bins)
    for s in scores:
        pooled.flips += s.flips
        pooled.dice += s.dice
    total = pooled.compute()
    row["flip_rate"] = total["flip_rate"]
    row["dice_change"] = total["dice_change"]
    return row


@dataclass
class Selection:
    """The outcome of :func:`select_calibrator`: the refitted winner and the CV table."""

    method: str
    calibrator: Calibrator
    criterion: str
    table: dict[str, dict[str, Any]]
    uncalibrated: dict[str, Any]
    folds: dict[str, int]
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"score", "admissible"}
    fit_voxels: int = CV_FIT_VOXELS

    @property
    def admissible(self) -> bool:
        """The winner improved (or kept) every region the criterion looks at."""
        return bool(self.scores.get(self.method, {}).get("admissible", True))

    def report(self) -> dict[str, Any]:
        """JSON-able summary (for ``calibrator.json``'s extra): criterion, winner, table, folds."""
        return {
            "criterion": self.criterion,
            "selected": self.method,
            "admissible": self.admissible,
            "scores": self.scores,
            "cv_table": self.table,
            "uncalibrated": self.uncalibrated,
            "folds": self.folds,
            "fit_voxels": self.fit_voxels,
        }

    def table_text(self) -> str:
        """The CV table as aligned text: held-out means, criterion score and seconds per method."""
        head = f"{'method':<22}{'NLL':>9}{'ECE all':>9}{'ECE fg':>9}{'ECE bd':>9}{'score':>8}{'seconds':>9}"
        lines = [head, "-" * len(head)]
        rows = [("uncalibrated", self.uncalibrated)] + sorted(self.table.items())
        for name, row in rows:
            if "error" in row:
                lines.append(f"{name:<22}failed: {row['error'][:80]}")
                continue
            values = "".join(f"{row[m]['mean']:>9.4f}" for m in REGION_METRICS)
            s = self.scores.get(name)
            mark = "" if s is None else f"{s['score']:>7.3f}{'' if s['admissible'] else '!'}"
            secs = f"{row['seconds']:>9.1f}" if "seconds" in row else ""
            lines.append(f"{name + (' *' if name == self.method else ''):<22}{values}{mark:>8}{secs}")
        if self.criterion == BALANCED:
            lines.append("score: mean of the four ratios to uncalibrated; ! = some region worse than uncalibrated")
        return "\n".join(lines)


def candidate_names(candidates: Sequence[str] | None = None, preserve: str = "none") -> list[str]:
    """The candidates after the ``preserve`` filter (default: every registered one but :data:`DEFAULT_EXCLUDED`)."""
    if preserve not in PRESERVE:
        raise ConfigError(f"preserve must be one of {', '.join(PRESERVE)}, got {preserve!r}")
    names = list(candidates) if candidates is not None else [n for n in list_calibrators() if n not in DEFAULT_EXCLUDED]
    classes = {name: calibrator_class(name) for name in names}
    if preserve == "argmax":
        names = [n for n in names if classes[n].preserves_argmax]
    elif preserve == "order":
        names = [n for n in names if classes[n].preserves_order]
    if not names:
        raise ConfigError(
            f"no candidate calibrator is left after preserve = {preserve!r} (candidates: {', '.join(classes)})"
        )
    return names


def select_calibrator(
    cases: CaseSource,
    case_ids: Sequence[str],
    num_classes: int,
    *,
    candidates: Sequence[str] | None = None,
    candidate_params: Mapping[str, Mapping[str, Any]] | None = None,
    criterion: str = BALANCED,
    preserve: str = "none",
    folds: int = 5,
    seed: int = 0,
    fit_region: str = ALL,
    boundary_mm: float = 2.0,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    fit_voxels: int = CV_FIT_VOXELS,
    groups: Mapping[str, str | None] | None = None,
    progress: bool = False,
) -> Selection:
    """Cross-validate the candidates over cases, choose one by ``criterion``, refit it on all cases.

    Args:
        cases, case_ids, num_classes, folds, seed, fit_region, boundary_mm, max_voxels, fit_voxels,
            groups, progress: as in :func:`cross_validate`.
        candidates: registered calibrator names (default: all but :data:`DEFAULT_EXCLUDED`).
        candidate_params: extra parameters per candidate name.
        criterion: one of :data:`~segcalib.calibrators.criteria.CRITERIA` (default ``balanced``).
        preserve: ``none``, ``argmax`` or ``order`` (keep only candidates that preserve it).

    Raises:
        ConfigError: unknown criterion, candidate, parameter or preserve value, or no candidate fitted.
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    names = candidate_names(candidates, preserve)
    params = {name: dict((candidate_params or {}).get(name, {})) for name in names}
    for name in names:  # fail on a bad parameter before reading any case
        if "max_voxels" in params[name]:
            raise ConfigError(f"calibrator '{name}': set max_voxels for the whole selection, not per candidate")
        build_calibrator(name, num_classes, **{"seed": seed, **params[name], "max_voxels": max_voxels})

    def builder(name: str) -> Builder:
        return lambda mv: build_calibrator(name, num_classes, **{"seed": seed, **params[name], "max_voxels": mv})

    cv = cross_validate(
        cases, case_ids, {name: builder(name) for name in names}, num_classes, folds=folds, seed=seed,
        fit_region=fit_region, boundary_mm=boundary_mm, max_voxels=max_voxels, fit_voxels=fit_voxels,
        groups=groups, progress=progress,
    )
    winner, scores = choose(criterion, cv.table, cv.uncalibrated, names)
    if winner is None:
        reasons = "; ".join(f"{n}: {r.get('error', 'criterion undefined')}" for n, r in cv.table.items())
        raise ConfigError(f"no candidate calibrator could be evaluated on criterion '{criterion}' ({reasons})")
    if not scores[winner]["admissible"]:
        log.warning(
            "auto: every candidate made NLL or the ECE of some region worse than the uncalibrated maps on the "
            "held-out folds; %s has the lowest %s score (%.3f)", winner, criterion, scores[winner]["score"],
        )
    with cpu_threads():
        refitted = cv.refit(winner)
    return Selection(winner, refitted, criterion, cv.table, cv.uncalibrated, cv.folds, scores,
                     min(fit_voxels, max_voxels))
