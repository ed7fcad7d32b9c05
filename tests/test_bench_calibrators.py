"""The calibrator and ensemble-memory benchmarks at tiny sizes: their figures are checked against
independent recomputations (float64 NLL and a numpy ECE on the same test cases)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import bench_calibrators as bc
from benchmarks import bench_ensemble_memory as bem

pytest.importorskip("fiducio")


def _reference_scores(folder, n_test: int) -> tuple[float, float]:
    """float64 NLL and 15-bin top-label ECE of the raw softmax over the test cases."""
    nll, conf, correct = [], [], []
    for i in range(bc.TEST_OFFSET, bc.TEST_OFFSET + n_test):
        z = torch.from_numpy(np.load(folder / f"{i}_logits.npy")).double()
        y = torch.from_numpy(np.load(folder / f"{i}_target.npy")).long()
        logp = torch.log_softmax(z, dim=1)
        nll.append(-logp.gather(1, y.unsqueeze(1)).flatten())
        conf.append(logp.exp().amax(1).flatten())
        correct.append((logp.argmax(1) == y).double().flatten())
    nll_all, conf_all, correct_all = (torch.cat(x).numpy() for x in (nll, conf, correct))
    bins = np.minimum((conf_all * 15).astype(int), 14)
    ece = sum(abs(conf_all[bins == b].sum() - correct_all[bins == b].sum()) for b in range(15)) / conf_all.size
    return float(nll_all.mean()), float(ece)


def test_synthetic_cases_are_seeded_and_over_confident() -> None:
    z1, y1 = bc.synthetic_case(3, 16, seed=1)
    z2, y2 = bc.synthetic_case(3, 16, seed=1)
    assert torch.equal(z1, z2) and torch.equal(y1, y2)
    assert z1.shape == (1, bc.CLASSES, 16, 16, 16) and y1.shape == (1, 16, 16, 16)
    assert set(y1.unique().tolist()) <= set(range(bc.CLASSES)) and (y1 != 0).any()
    ce = [float(torch.nn.functional.cross_entropy(z1 / t, y1)) for t in (1.0, 2.0)]
    assert ce[1] < ce[0]  # a temperature above 1 helps: the model is over-confident


def test_rows_match_an_independent_recomputation(tmp_path, monkeypatch, capsys) -> None:
    n_test = 2
    monkeypatch.setattr(bc, "run_in_child", lambda spec, timeout=None: bc.run_row(**spec))
    out_json = tmp_path / "figures.json"
    argv = ["--cases", "3", "--size", "10", "--test-cases", str(n_test), "--sweep", "2", "--sweep-size", "8",
            "--methods", "temperature", "--json", str(out_json)]
    monkeypatch.setattr(bc.tempfile, "TemporaryDirectory", lambda prefix: _Keep(tmp_path))
    assert bc.main(argv) == 0
    printed = capsys.readouterr().out
    figures = json.loads(out_json.read_text())
    rows = {(r["lib"], r["method"], r["region"]): r for r in figures["rows"]}
    nll, ece = _reference_scores(tmp_path / "cases10", n_test)
    raw = rows[("none", "uncalibrated", "-")]
    assert raw["nll"] == pytest.approx(nll, rel=1e-5)
    assert raw["ece_all"] == pytest.approx(ece, abs=1e-5)
    ours, theirs = rows[("segcalib", "temperature", "all")], rows[("fiducio", "temperature", "all")]
    assert ours["voxels_used"] == theirs["voxels_used"] == 3 * 10**3  # below max_voxels: every voxel
    assert ours["nll"] < raw["nll"] and ours["nll"] == pytest.approx(theirs["nll"], rel=1e-3)
    ratio = figures["goals"]["nll_ratio"]["temperature"]
    assert ratio == pytest.approx(ours["nll"] / theirs["nll"])
    assert f"NLL {ratio:.3f}" in printed and "temperature 1." in printed.split("goals:")[1]
    assert [s["cases"] for s in figures["sweep"]] == [2]
    assert figures["sweep"][0]["volume_mib"] == pytest.approx(bc.CLASSES * 8**3 * 4 / 2**20)


class _Keep:
    """A TemporaryDirectory stand-in that leaves the cases in pytest's tmp_path for the check."""

    def __init__(self, path) -> None:
        self.path = path

    def __enter__(self) -> str:
        return str(self.path)

    def __exit__(self, *exc) -> None:
        return None


def test_ensemble_memory_measures_one_export(tmp_path) -> None:
    single = bem.measure(16, 3, 1)
    pair = bem.measure(16, 3, 2)
    assert single["output_mib"] == pytest.approx(16**3 * 3 * 4 / 2**20)
    assert single["files"] == ["case_probs.nii.gz", "case_seg.nii.gz", "case_uncertainty.nii.gz"]
    assert pair["files"] == ["case_entropy.nii.gz", "case_expected_entropy.nii.gz", "case_mutual_info.nii.gz",
                             "case_probs.nii.gz", "case_seg.nii.gz"]
    assert single["peak_above_baseline_mib"] >= 0 and pair["members"] == 2
