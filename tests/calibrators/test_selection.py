"""``auto`` selection: folds split cases, held-out cases are never seen, the generating calibrator wins."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

from segcalib.calibrators import Calibrator
from segcalib.calibrators.boundary_temperature import signed_boundary_distance
from segcalib.calibrators.selection import assign_folds, candidate_names, cross_validate, select_calibrator
from segcalib.errors import ConfigError, DataError
from tests.calibrators._single_thread import single_thread  # noqa: F401 (autouse fixture)

SHAPE = (12, 12, 12)
SPACING = (1.0, 1.0, 2.0)


def _blob_logits(g: torch.Generator, num_classes: int) -> Tensor:
    """Clean logits ``(1, C, *SHAPE)``: class k > 0 favoured inside its ball, background outside."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in SHAPE], indexing="ij"))
    z = [torch.randn(SHAPE, generator=g) * 0.5 + 1.0]
    for _ in range(1, num_classes):
        centre = (torch.rand(3, generator=g) * 4 + 4).view(3, 1, 1, 1)
        radius = float(torch.rand(1, generator=g)) * 2 + 3
        z.append(-(((grid - centre) ** 2).sum(0).sqrt() - radius) * 1.5 + torch.randn(SHAPE, generator=g) * 0.7)
    return torch.stack(z)[None]


def _sample_labels(g: torch.Generator, probs: Tensor) -> Tensor:
    flat = probs[0].reshape(probs.shape[1], -1).T
    return torch.multinomial(flat, 1, generator=g).reshape(1, *SHAPE)


def _class_temperature_cases(n: int, temperatures=(0.7, 2.0, 1.2)) -> dict[str, tuple[Tensor, Tensor]]:
    """Labels drawn from ``softmax(z / T_k)`` with one temperature per class."""
    g = torch.Generator().manual_seed(11)
    t = torch.tensor(temperatures).view(1, -1, 1, 1, 1)
    cases = {}
    for i in range(n):
        z = _blob_logits(g, len(temperatures))
        cases[f"case{i:02d}"] = (z, _sample_labels(g, torch.softmax(z / t, dim=1)))
    return cases


def _source(cases: dict[str, tuple[Tensor, Tensor]], log: list[str] | None = None):
    def iterate():
        for case_id, (z, y) in cases.items():
            if log is not None:
                log.append(case_id)
            yield case_id, z, y, SPACING, None

    return iterate


class _Spy(Calibrator):
    """Identity calibrator that remembers which cases (marked in logit 0 of voxel 0) it was fitted on."""

    name = "spy"
    preserves_argmax = True
    preserves_order = True
    transformed: list[tuple[int, tuple[int, ...]]] = []

    def __init__(self, num_classes: int, *, seed: int = 0, max_voxels: int = 10_000) -> None:
        super().__init__(num_classes, seed=seed, max_voxels=max_voxels)
        self.seen: set[int] = set()

    def update(self, logits, target, mask=None, *, spacing=None, image=None) -> None:
        self.seen.add(int(logits[0, 0].reshape(-1)[0]))

    def merge(self, other) -> None:
        self.seen |= other.seen

    def reset(self) -> None:
        self.seen = set()

    def _fit(self) -> None:
        pass

    def _transform(self, logits, *, spacing, image) -> Tensor:
        _Spy.transformed.append((int(logits[0, 0].reshape(-1)[0]), tuple(sorted(self.seen))))
        return torch.softmax(logits, dim=1)

    def _state(self) -> dict[str, Any]:
        return {"seen": sorted(self.seen)}

    def _load_state(self, state, tensors) -> None:
        self.seen = set(state["seen"])

    @classmethod
    def from_params(cls, num_classes, params, tensors=None) -> "_Spy":  # not registered: no registry lookup
        spy = cls(num_classes, seed=params["seed"], max_voxels=params["max_voxels"])
        spy._load_state(params, tensors or {})
        spy.fitted = True
        return spy


def test_folds_are_disjoint_balanced_and_seeded() -> None:
    ids = [f"c{i}" for i in range(13)]
    folds = assign_folds(ids, 5, seed=3)
    assert set(folds) == set(ids) and set(folds.values()) == set(range(5))
    sizes = sorted(list(folds.values()).count(f) for f in range(5))
    assert sizes == [2, 2, 3, 3, 3]
    assert assign_folds(ids, 5, seed=3) == folds and assign_folds(ids, 5, seed=4) != folds
    assert set(assign_folds(ids[:3], 5).values()) == {0, 1, 2}  # k = min(folds, cases)
    with pytest.raises(DataError, match="c1"):
        assign_folds(["c0", "c1", "c1"], 2)


def test_held_out_case_never_seen_and_two_passes() -> None:
    cases = {}
    for i in range(7):
        z = torch.randn(1, 2, 4, 4, 4)
        z[0, 0, 0, 0, 0] = 100 + i  # the case's mark
        cases[f"c{i}"] = (z, torch.randint(0, 2, (1, 4, 4, 4)))
    log: list[str] = []
    _Spy.transformed = []
    cv = cross_validate(_source(cases, log), list(cases), {"spy": lambda mv: _Spy(2, max_voxels=mv)}, 2, folds=3)
    assert len(log) == 2 * len(cases)  # one pass to update, one to score
    assert len(_Spy.transformed) == len(cases)
    for mark, seen in _Spy.transformed:
        case = f"c{mark - 100}"
        same_fold = {100 + int(c[1:]) for c, f in cv.folds.items() if f == cv.folds[case]}
        assert mark not in seen
        assert set(seen) == set(range(100, 107)) - same_fold  # trained on every other fold, all of it
    assert cv.refit("spy").seen == set(range(100, 107))


def test_class_temperature_data_selects_class_temperature_under_nll() -> None:
    cases = _class_temperature_cases(6)
    candidates = ["temperature", "class_temperature", "ensemble_temperature", "histogram_binning", "isotonic"]
    selection = select_calibrator(
        _source(cases), list(cases), 3, candidates=candidates, criterion="nll", folds=3, max_voxels=6000,
        candidate_params={"ensemble_temperature": {"max_iter": 30}},
    )
    assert selection.method == "class_temperature"
    t = selection.calibrator.get_params()["temperatures"]
    assert t == pytest.approx([0.7, 2.0, 1.2], rel=0.25)
    table = selection.table
    assert set(table) == set(candidates)
    for row in table.values():
        for metric in ("nll", "ece_all", "ece_foreground", "ece_boundary"):
            assert math.isfinite(row[metric]["mean"]) and math.isfinite(row[metric]["std"])
            assert row[metric]["std"] >= 0 and len(row[metric]["folds"]) == 3
        assert 0 <= row["flip_rate"] <= 1 and math.isfinite(row["dice_change"])
    assert table["temperature"]["flip_rate"] == 0.0 and table["temperature"]["dice_change"] == 0.0
    assert table["class_temperature"]["nll"]["mean"] < table["temperature"]["nll"]["mean"]
    assert table["class_temperature"]["nll"]["mean"] < selection.uncalibrated["nll"]["mean"]
    report = selection.report()
    assert report["selected"] == "class_temperature" and report["folds"] == selection.folds


def test_held_out_scores_match_a_direct_computation() -> None:
    cases = _class_temperature_cases(4)
    cv = cross_validate(_source(cases), list(cases), {}, 3, folds=2)
    for fold in (0, 1):
        zs = torch.cat([cases[c][0] for c, f in cv.folds.items() if f == fold]).double()
        ys = torch.cat([cases[c][1] for c, f in cv.folds.items() if f == fold])
        p = torch.softmax(zs, dim=1)
        nll = -p.gather(1, ys.unsqueeze(1)).log().mean()
        conf, pred = p.max(dim=1)
        bins = (conf * 15).ceil().sub(1).clamp(0, 14).long()
        ece = sum(
            abs(float((pred == ys)[bins == b].double().sum() - conf[bins == b].sum())) for b in range(15)
        ) / conf.numel()
        fg = ys != 0
        ece_fg = sum(
            abs(float((pred == ys)[fg & (bins == b)].double().sum() - conf[fg & (bins == b)].sum())) for b in range(15)
        ) / int(fg.sum())
        assert cv.uncalibrated["nll"]["folds"][fold] == pytest.approx(float(nll), rel=1e-6)
        assert cv.uncalibrated["ece_all"]["folds"][fold] == pytest.approx(ece, rel=1e-6)
        assert cv.uncalibrated["ece_foreground"]["folds"][fold] == pytest.approx(ece_fg, rel=1e-6)


def test_boundary_dependent_data_selects_boundary_temperature() -> None:
    g = torch.Generator().manual_seed(5)
    cases = {}
    for i in range(6):
        z = _blob_logits(g, 2) * 2
        d = signed_boundary_distance(z, [SPACING])
        t = torch.exp(0.1 + 1.0 * torch.exp(-d * d / 8)).unsqueeze(1)
        cases[f"b{i}"] = (z, _sample_labels(g, torch.softmax(z / t, dim=1)))
    selection = select_calibrator(
        _source(cases), list(cases), 2, candidates=["temperature", "boundary_temperature"], criterion="nll",
        folds=2, max_voxels=6000, candidate_params={"boundary_temperature": {"max_iter": 60}},
    )
    assert selection.method == "boundary_temperature"


def test_preserve_filter_and_bad_options() -> None:
    order = candidate_names(["temperature", "histogram_binning", "class_temperature", "ensemble_temperature"], "order")
    assert order == ["temperature", "ensemble_temperature"]
    assert "histogram_binning" in candidate_names(["temperature", "histogram_binning"], "none")
    assert "lts" not in candidate_names()
    with pytest.raises(ConfigError, match="histogram_binning"):
        candidate_names(["histogram_binning"], "argmax")
    cases = _class_temperature_cases(2)
    with pytest.raises(ConfigError, match="criterion"):
        select_calibrator(_source(cases), list(cases), 3, criterion="brier")
    with pytest.raises(ConfigError, match="nope"):
        select_calibrator(_source(cases), list(cases), 3, candidates=["nope"])
    with pytest.raises(DataError, match="case02"):
        select_calibrator(_source(cases), ["case00", "case01", "case02"], 3, candidates=["temperature"])


def test_a_failing_candidate_drops_out_with_its_reason() -> None:
    cases = _class_temperature_cases(3)
    lts = {"use_image": True, "crop": 4, "steps": 1, "hidden": 2, "layers": 1}
    selection = select_calibrator(
        _source(cases), list(cases), 3, candidates=["temperature", "lts"], candidate_params={"lts": lts}, folds=3
    )
    assert selection.method == "temperature"
    assert "image" in selection.table["lts"]["error"] and "case00" in selection.table["lts"]["error"]
    with pytest.raises(DataError, match="every candidate"):
        select_calibrator(_source(cases), list(cases), 3, candidates=["lts"], candidate_params={"lts": lts}, folds=3)


class _SampleSpy(Calibrator):
    """Counts the voxels it is fitted on (a stratified sample bounded by ``max_voxels``)."""

    name = "sample_spy"
    fitted_sizes: list[int] = []

    def __init__(self, num_classes: int, *, seed: int = 0, max_voxels: int = 10_000) -> None:
        super().__init__(num_classes, seed=seed, max_voxels=max_voxels)
        from segcalib.calibrators.sample import StratifiedSample

        self.sample = StratifiedSample(num_classes, max_voxels, seed)

    def update(self, logits, target, mask=None, *, spacing=None, image=None) -> None:
        self.sample.add(logits, target, mask)

    def merge(self, other) -> None:
        self.sample.merge(other.sample)

    def reset(self) -> None:
        pass

    def _fit(self) -> None:
        _SampleSpy.fitted_sizes.append(len(self.sample))

    def _transform(self, logits, *, spacing, image) -> Tensor:
        return torch.softmax(logits, dim=1)

    def _state(self) -> dict[str, Any]:
        return {}

    def _load_state(self, state, tensors) -> None:
        pass

    @classmethod
    def from_params(cls, num_classes, params, tensors=None) -> "_SampleSpy":
        spy = cls(num_classes, seed=params["seed"], max_voxels=params["max_voxels"])
        spy.fitted = True
        return spy


def test_folds_fit_on_fit_voxels_and_the_refit_on_max_voxels() -> None:
    cases = _class_temperature_cases(4)  # 4 x 1728 voxels, 3 classes
    _SampleSpy.fitted_sizes = []
    cv = cross_validate(_source(cases), list(cases), {"s": lambda mv: _SampleSpy(3, max_voxels=mv)}, 3, folds=2,
                        max_voxels=6000, fit_voxels=600)
    assert _SampleSpy.fitted_sizes == [600, 600]  # 200 per class: each class has more than 200 voxels per fold
    assert cv.table["s"]["seconds"] >= 0
    cv.refit("s")
    counts = torch.bincount(torch.cat([y.reshape(-1) for _, y in cases.values()]), minlength=3)
    assert _SampleSpy.fitted_sizes[-1] == int(counts.clamp(max=2000).sum())  # max_voxels / C per class


def test_selection_respects_groups_and_reports_the_balanced_choice() -> None:
    cases = _class_temperature_cases(6)
    groups = {case_id: f"patient{i // 2}" for i, case_id in enumerate(cases)}
    selection = select_calibrator(_source(cases), list(cases), 3, candidates=["temperature", "class_temperature"],
                                  folds=3, max_voxels=6000, groups=groups)
    for i in range(0, 6, 2):
        a, b = list(cases)[i : i + 2]
        assert selection.folds[a] == selection.folds[b]
    report = selection.report()
    assert report["criterion"] == "balanced" and report["selected"] in report["scores"]
    assert report["admissible"] == report["scores"][report["selected"]]["admissible"]
    text = selection.table_text()
    assert "uncalibrated" in text and f"{selection.method} *" in text
