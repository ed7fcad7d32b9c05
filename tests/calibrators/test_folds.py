"""Folds over cases: seeded and balanced; with groups, no group is ever split across folds."""

from __future__ import annotations

import pytest

from segcalib.calibrators.folds import assign_folds
from segcalib.errors import DataError


def test_without_groups_the_assignment_is_unchanged_by_an_empty_group_map() -> None:
    ids = [f"c{i}" for i in range(11)]
    assert assign_folds(ids, 4, seed=2) == assign_folds(ids, 4, seed=2, groups={i: None for i in ids})


@pytest.mark.parametrize("seed", range(6))
def test_groups_are_never_split_and_folds_stay_balanced(seed: int) -> None:
    # two cardiac phases per patient (ED, ES), one patient with three scans, two ungrouped cases
    groups = {f"p{p}_{phase}": f"p{p}" for p in range(9) for phase in ("ed", "es")}
    groups.update({"p9_a": "p9", "p9_b": "p9", "p9_c": "p9", "lone1": None, "lone2": None})
    ids = sorted(groups)
    folds = assign_folds(ids, 5, seed=seed, groups=groups)
    assert set(folds) == set(ids) and set(folds.values()) == set(range(5))
    for patient in {g for g in groups.values() if g}:
        assert len({folds[c] for c, g in groups.items() if g == patient}) == 1, patient
    sizes = [list(folds.values()).count(f) for f in range(5)]
    assert sum(sizes) == len(ids) and max(sizes) - min(sizes) <= 3  # at most one 3-scan group of imbalance
    assert folds == assign_folds(ids, 5, seed=seed, groups=groups)  # seeded


def test_k_is_bounded_by_the_number_of_groups() -> None:
    groups = {"a1": "a", "a2": "a", "b1": "b", "b2": "b", "b3": "b"}
    folds = assign_folds(list(groups), 5, seed=0, groups=groups)
    assert sorted(set(folds.values())) == [0, 1]
    assert folds["a1"] == folds["a2"] and folds["b1"] == folds["b2"] == folds["b3"] != folds["a1"]
    with pytest.raises(DataError, match="2 groups"):
        assign_folds(["x1", "x2"], 2, groups={"x1": "x", "x2": "x"})
