"""Logits or probabilities (auto-detected, declared by name, forced), and pairing maps with
manifest cases and their labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segcalib.data import Case, read_header
from segcalib.errors import DataError
from segcalib.predictions import check_geometry, match_cases, open_predictions, probability_error, resolve_kind
from tests.synthetic import LPS_ANISO, write_nifti

SHAPE = (7, 6, 4)


def _logits(seed: int = 0, n_classes: int = 3) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(*SHAPE, n_classes)) * 3).astype(np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def test_probability_error_by_hand() -> None:
    values = np.array([[0.5, 0.2, 1.0], [0.5, 0.8005, -0.0002]], np.float32)  # (C=2, 3 voxels)
    # sums 1, 1.0005, 0.9998: off by 5e-4; min -2e-4
    assert probability_error(values) == pytest.approx(5e-4, abs=1e-6)
    assert probability_error(np.array([[0.3], [0.3]], np.float32)) == pytest.approx(0.4, abs=1e-6)
    assert probability_error(np.array([[1.5], [-0.5]], np.float32)) == pytest.approx(0.5, abs=1e-6)


def test_auto_detection_from_values(tmp_path: Path) -> None:
    logits = _logits()
    probs = _softmax(logits)
    rounded = probs + np.float32(4e-4) * (np.arange(3) == 0)  # within the 1e-3 tolerance
    rounded[0, 0, 0] = [-2e-4, 0.5002, 0.5]  # a slightly negative value, read as 0
    noisy = probs + np.float32(5e-3) * (np.arange(3) == 0)  # beyond it: not probabilities
    for name, array in (("logits", logits), ("probs", probs), ("rounded", rounded), ("noisy", noisy)):
        write_nifti(tmp_path / f"{name}.nii.gz", array)
    ids = open_predictions(tmp_path).case_ids()
    # a fresh folder per case: one folder refuses to mix kinds (next test)
    assert {c: open_predictions(tmp_path).read(c).kind for c in ids} == {
        "logits": "logits", "probs": "probs", "rounded": "probs", "noisy": "logits"}
    read = open_predictions(tmp_path).read("rounded").values
    assert read[0, 0, 0, 0] == 0.0 and read[1, 0, 0, 0] == np.float32(0.5002)
    assert (rounded > 1).any() and read.max() == 1.0  # 0.9999 + 4e-4 is read as 1
    assert np.array_equal(read, np.clip(np.moveaxis(rounded, -1, 0), 0, 1))
    # non-negative values summing to 1 are probabilities, however they were made
    assert resolve_kind(np.full((4, 2, 2), 0.25, np.float32), "auto", None, tmp_path / "x") == "probs"
    assert resolve_kind(np.full((4, 2, 2), 0.5, np.float32), "auto", None, tmp_path / "x") == "logits"


def test_a_folder_does_not_mix_kinds_silently(tmp_path: Path) -> None:
    write_nifti(tmp_path / "a.nii.gz", _softmax(_logits(1)))
    write_nifti(tmp_path / "b.nii.gz", _logits(2))
    folder = open_predictions(tmp_path)
    assert folder.read("a").kind == "probs"
    with pytest.raises(DataError, match="case b reads as logits but case a as probs; pass input="):
        folder.read("b")
    forced = open_predictions(tmp_path, input="logits")
    with pytest.raises(DataError, match=r"case a: .*a.nii.gz: input=logits, but the values are probabilities"):
        forced.read("a")  # read as logits, probabilities would be flattened (issue 21)
    assert forced.read("b").kind == "logits"
    assert np.array_equal(forced.read("b").values, np.moveaxis(_logits(2), -1, 0))


def test_declared_and_forced_kinds(tmp_path: Path) -> None:
    logits = _logits()
    write_nifti(tmp_path / "named" / "x_probs.nii.gz", logits)  # says probabilities, holds logits
    with pytest.raises(DataError, match=r"x_probs.nii.gz: values are not probabilities .* its name or format says"):
        open_predictions(tmp_path / "named").read("x")
    assert open_predictions(tmp_path / "named", input="logits").read("x").kind == "logits"
    write_nifti(tmp_path / "named2" / "y_logits.nii.gz", _softmax(logits))  # values in [0, 1] summing to 1
    assert open_predictions(tmp_path / "named2").read("y").kind == "probs"  # are probabilities, whatever the name
    write_nifti(tmp_path / "plain" / "z.nii.gz", logits)
    with pytest.raises(DataError, match=r"z.nii.gz: values are not probabilities .*the option input=probs"):
        open_predictions(tmp_path / "plain", input="probs").read("z")
    bad = logits.copy()
    bad[1, 2, 3, 0] = np.nan
    write_nifti(tmp_path / "nan" / "n.nii.gz", bad)
    with pytest.raises(DataError, match="n.nii.gz: holds NaN or infinite values"):
        open_predictions(tmp_path / "nan", input="logits").read("n")


def _labelled(root: Path, case_id: str, affine=LPS_ANISO, shape=SHAPE) -> Case:
    label = write_nifti(root / "labels" / f"{case_id}.nii.gz", np.zeros(shape, np.uint8), affine)
    return Case(case_id, (label,), label, "validation")


def test_match_cases_missing_and_extra(tmp_path: Path) -> None:
    for case_id in ("c1", "c2", "extra"):
        write_nifti(tmp_path / "maps" / f"{case_id}_probs.nii.gz", _softmax(_logits()), LPS_ANISO)
    folder = open_predictions(tmp_path / "maps")
    cases = [_labelled(tmp_path, c) for c in ("c2", "c1")]
    pairs = match_cases(folder, cases)  # the extra map is ignored; the cases' order is kept
    assert [(c.case_id, e.path.name) for c, e in pairs] == [("c2", "c2_probs.nii.gz"), ("c1", "c1_probs.nii.gz")]
    cases += [_labelled(tmp_path, c) for c in ("c3", "c4")]
    with pytest.raises(DataError, match=r"case c3: no prediction map in .*maps \(2 of 4 case\(s\) have none: c3, c4"):
        match_cases(folder, cases)
    many = [Case(f"m{i:02d}", (), None, "test") for i in range(12)]
    with pytest.raises(DataError, match="12 of 12 .*m09 and 2 more"):
        match_cases(folder, many)


def test_check_geometry_names_both_files(tmp_path: Path) -> None:
    write_nifti(tmp_path / "maps" / "c1.nii.gz", _softmax(_logits()), LPS_ANISO)
    pred = open_predictions(tmp_path / "maps").read("c1")
    check_geometry(pred, read_header(_labelled(tmp_path, "same").label), num_classes=3)

    shifted = LPS_ANISO.copy()
    shifted[0, 3] += 0.01  # 0.01 mm: beyond the 1e-4 mm tolerance
    label = _labelled(tmp_path, "shifted", shifted).label
    with pytest.raises(DataError, match=r"maps/c1.nii.gz: affine differs from the label .*shifted.nii.gz by up to 0.01 mm"):
        check_geometry(pred, read_header(label))
    nudged = LPS_ANISO.copy()
    nudged[0, 3] += 5e-5  # within the tolerance
    check_geometry(pred, read_header(_labelled(tmp_path, "nudged", nudged).label))

    label = _labelled(tmp_path, "small", shape=(7, 6, 3)).label
    with pytest.raises(DataError, match=r"c1.nii.gz: spatial shape \(7, 6, 4\) differs from the label .*small.nii.gz shape \(7, 6, 3\)"):
        check_geometry(pred, read_header(label))
    with pytest.raises(DataError, match=r"c1.nii.gz: 3 classes, the manifest of .*same.nii.gz declares 4"):
        check_geometry(pred, read_header(tmp_path / "labels" / "same.nii.gz"), num_classes=4)
