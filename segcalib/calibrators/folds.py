"""Folds of a cross-validation over cases: seeded, balanced, and never splitting a group of cases.

A group is what must not be split between fitting and scoring: the cases of one patient (two cardiac
phases, a baseline and a follow-up scan). Without groups every case is independent and the folds are
a seeded permutation dealt round-robin; with groups, whole groups are dealt (in a seeded order, each
to the fold that holds the fewest cases so far), so no group is ever on both sides of a fold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from segcalib.errors import ConfigError, DataError


def assign_folds(
    case_ids: Sequence[str], folds: int = 5, seed: int = 0, groups: Mapping[str, str | None] | None = None
) -> dict[str, int]:
    """Fold of each case (``k = min(folds, n_units)`` folds, where a unit is a group or an ungrouped case).

    Args:
        case_ids: unique case ids.
        folds: the number of folds asked for (>= 2).
        seed: seed of the permutation.
        groups: case id -> group (None or missing: the case is its own group).

    Raises:
        DataError: repeated ids, or fewer than 2 cases (or groups) to split.
        ConfigError: ``folds`` is not an integer >= 2.
    """
    ids = list(case_ids)
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        twice = sorted({i for i in ids if i in seen or seen.add(i)})  # type: ignore[func-returns-value]
        raise DataError(f"case ids must be unique; repeated: {', '.join(map(str, twice[:5]))}")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"folds must be an integer >= 2, got {folds!r}")
    if len(ids) < 2:
        raise DataError(f"cross-validation needs at least 2 cases, got {len(ids)}")
    generator = torch.Generator().manual_seed(seed)
    grouped = {i: (groups or {}).get(i) for i in ids}
    if all(g is None for g in grouped.values()):
        k = min(folds, len(ids))
        order = torch.randperm(len(ids), generator=generator).tolist()
        return {ids[j]: i % k for i, j in enumerate(order)}
    units: dict[str, list[str]] = {}
    for case_id in ids:
        group = grouped[case_id]
        units.setdefault(f"g:{group}" if group is not None else f"c:{case_id}", []).append(case_id)
    if len(units) < 2:
        raise DataError(
            f"cross-validation needs at least 2 groups of cases, got 1 (every case is in group '{grouped[ids[0]]}')"
        )
    k = min(folds, len(units))
    keys = list(units)
    order = [keys[j] for j in torch.randperm(len(keys), generator=generator).tolist()]
    sizes = [0] * k
    out: dict[str, int] = {}
    for position, key in enumerate(order):
        fold = position if position < k else min(range(k), key=lambda f: (sizes[f], f))  # every fold non-empty
        sizes[fold] += len(units[key])
        out.update({case_id: fold for case_id in units[key]})
    return {case_id: out[case_id] for case_id in ids}
