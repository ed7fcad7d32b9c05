"""``--method auto``: choose a calibrator by k-fold cross-validation over cases, streamed.

Folds split the *cases* (a fold never splits a case): :func:`assign_folds` deals a seeded permutation
of the case ids round-robin into ``k = min(folds, n_cases)`` folds. The cases are read through a
callable that yields ``(case_id, logits (1, C, *S), target (1, *S), spacing, image | None)`` one case
at a time, twice in all:

1. every case updates, for every candidate, the calibrator of its own fold (each keeping a bounded
   state of ``max_voxels / (k - 1)`` voxels, so that the k - 1 folds merged for training hold
   ``max_voxels``); the calibrator of fold f is then fitted on the *merge* of the other folds' states
   and kept only as its fitted parameters;
2. every case is transformed by each candidate's calibrator of its own fold -- never trained on it --
   and scored: held-out NLL (all voxels) and ECE of the ``all``, ``foreground`` and ``boundary``
   ground-truth regions (15 bins, SPEC §3), the argmax flip rate and the pooled Dice change against
   the uncalibrated argmax (so flip rate and Dice change are cross-validated too).

Memory holds one case plus each candidate's k bounded states. The table gives per method and
metric the mean and sample standard deviation over folds (plus each fold's value); the winner has
the lowest mean of the criterion (``nll``, ``ece_all``, ``ece_foreground`` or ``ece_boundary``) and
is refitted on all cases -- the merge of its k fold states, which needs no third pass. ``preserve``
keeps only candidates that preserve the argmax (``argmax``) or the class order (``order``). A candidate
that fails on the data (DataError / ValueError in update, fit or transform, e.g. LTS with ``use_image``
and no image) drops out; its table row is ``{"error": reason}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from segcalib.calibrators._heldout import REGIONS, HeldOutScores
from segcalib.calibrators.base import Calibrator
from segcalib.calibrators.registry import build_calibrator, calibrator_class, list_calibrators
from segcalib.errors import ConfigError, DataError
from segcalib.inference.temperature import DEFAULT_MAX_VOXELS
from segcalib.spatial import RegionContext, available_regions, region_mask
from segcalib.spatial.regions import ALL
from segcalib.utils.tensors import as_label_map

CaseItem = tuple[str, Tensor, Tensor, "Sequence[float] | None", "Tensor | None"]
CaseSource = Callable[[], Iterable[CaseItem]]
Builder = Callable[[int], Calibrator]  # max_voxels -> an unfitted calibrator

CRITERIA = ("nll", *(f"ece_{region}" for region in REGIONS))
METRICS = (*CRITERIA, "flip_rate", "dice_change")
PRESERVE = ("none", "argmax", "order")
DEFAULT_EXCLUDED = ("lts",)  # a trained network per fold: offered only when named


def assign_folds(case_ids: Sequence[str], folds: int = 5, seed: int = 0) -> dict[str, int]:
    """Fold of each case: a seeded permutation dealt round-robin into ``min(folds, n)`` folds."""
    ids = list(case_ids)
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        twice = sorted({i for i in ids if i in seen or seen.add(i)})  # type: ignore[func-returns-value]
        raise DataError(f"case ids must be unique; repeated: {', '.join(map(str, twice[:5]))}")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"folds must be an integer >= 2, got {folds!r}")
    if len(ids) < 2:
        raise DataError(f"cross-validation needs at least 2 cases, got {len(ids)}")
    k = min(folds, len(ids))
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    return {ids[j]: i % k for i, j in enumerate(order)}


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
        max_voxels: bounded state of each fitted calibrator.

    Raises:
        DataError: a yielded id is unknown, repeated within a pass or missing.
    """
    if fit_region not in available_regions():
        raise ConfigError(f"fit_region must be one of {', '.join(available_regions())}, got {fit_region!r}")
    fold_of = assign_folds(case_ids, folds, seed)
    k = max(fold_of.values()) + 1
    per_fold = max(num_classes, max_voxels // (k - 1))
    states = {name: [build(per_fold) for _ in range(k)] for name, build in builders.items()}
    errors: dict[str, str] = {}  # a candidate that fails (e.g. needs an image) drops out, named in the table
    for case_id, logits, target, spacing, image in _stream(cases, fold_of, num_classes):
        mask = _masks(target, spacing, num_classes, boundary_mm, (fit_region,))[fit_region]
        for name in builders:
            if name not in errors:
                try:
                    states[name][fold_of[case_id]].update(logits, target, mask, spacing=[spacing], image=image)
                except (DataError, ValueError) as exc:
                    errors[name] = f"case '{case_id}': {type(exc).__name__}: {exc}"
    if builders and len(errors) == len(builders):
        reasons = "; ".join(f"{name}: {message}" for name, message in errors.items())
        raise DataError(f"every candidate calibrator failed on the cases: {reasons}")

    fitted: dict[str, list[Calibrator]] = {}
    for name, build in builders.items():
        if name in errors:
            continue
        try:
            fitted[name] = [_fit_without(build(max_voxels), states[name], f) for f in range(k)]
        except (DataError, ValueError, RuntimeError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"

    scores = {name: [HeldOutScores(num_classes, n_bins) for _ in range(k)] for name in fitted}
    reference = [HeldOutScores(num_classes, n_bins) for _ in range(k)]
    for case_id, logits, target, spacing, image in _stream(cases, fold_of, num_classes):
        f = fold_of[case_id]
        regions = _masks(target, spacing, num_classes, boundary_mm, REGIONS)
        raw = torch.softmax(logits.detach().float(), dim=1)
        before = raw.argmax(dim=1)
        reference[f].update(raw, target, regions, regions[ALL], before)
        del raw
        for name, calibrators in list(fitted.items()):
            try:
                probs = calibrators[f].transform(logits, spacing=[spacing], image=image)
            except (DataError, ValueError) as exc:
                errors[name] = f"case '{case_id}': {type(exc).__name__}: {exc}"
                del fitted[name]
                continue
            scores[name][f].update(probs, target, regions, regions[ALL], before)
            del probs

    table = {name: _summary(scores[name]) for name in fitted}
    table.update({name: {"error": message} for name, message in errors.items()})
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


def _masks(
    target: Tensor, spacing: Any, num_classes: int, boundary_mm: float, names: Sequence[str]
) -> dict[str, Tensor]:
    """Boolean ``(1, *S)`` ground-truth region masks, restricted to labels in ``0..C-1``."""
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
    for metric in CRITERIA:
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

    def report(self) -> dict[str, Any]:
        """JSON-able summary (for ``calibrator.json``'s extra): criterion, winner, table, folds."""
        return {
            "criterion": self.criterion,
            "selected": self.method,
            "cv_table": self.table,
            "uncalibrated": self.uncalibrated,
            "folds": self.folds,
        }


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
    criterion: str = "nll",
    preserve: str = "none",
    folds: int = 5,
    seed: int = 0,
    fit_region: str = ALL,
    boundary_mm: float = 2.0,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> Selection:
    """Cross-validate the candidates over cases, pick the lowest mean ``criterion``, refit it on all cases.

    Args:
        cases, case_ids, num_classes, folds, seed, fit_region, boundary_mm, max_voxels: as in
            :func:`cross_validate`.
        candidates: registered calibrator names (default: all but :data:`DEFAULT_EXCLUDED`).
        candidate_params: extra parameters per candidate name.
        criterion: one of :data:`CRITERIA`.
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
        fit_region=fit_region, boundary_mm=boundary_mm, max_voxels=max_voxels,
    )
    scored = {
        name: row[criterion]["mean"] for name, row in cv.table.items()
        if "error" not in row and math.isfinite(row[criterion]["mean"])
    }
    if not scored:
        reasons = "; ".join(f"{n}: {r.get('error', 'criterion undefined')}" for n, r in cv.table.items())
        raise ConfigError(f"no candidate calibrator could be evaluated on criterion '{criterion}' ({reasons})")
    winner = min(names, key=lambda n: scored.get(n, math.inf))
    return Selection(winner, cv.refit(winner), criterion, cv.table, cv.uncalibrated, cv.folds)
