"""Issue 21 end to end on the smoke run: a calibrator fitted on probability maps gives the same maps
through ``export --calibrator`` (logits) and ``calibrate apply`` (logits or probabilities); a
logits calibrator meets no probabilities; refused commands leave the output folder as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segcalib.cli import main
from segcalib.config import load_config
from segcalib.data import load_manifest, read_volume
from segcalib.export import ExportOptions, export

pytestmark = pytest.mark.slow


def _manifest(smoke_run: Path) -> str:
    return str(load_config(smoke_run / "config.yaml").data.manifest)


def listing(folder: Path) -> dict[str, int] | None:
    """Names and sizes of what ``folder`` holds (None: no folder)."""
    if not folder.exists():
        return None
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def maps(smoke_run: Path, tmp_path_factory) -> Path:
    """Validation and test exports with logits, and copies holding only the ``_probs`` maps."""
    root = tmp_path_factory.mktemp("spaces")
    for split in ("validation", "test"):
        export(smoke_run, _manifest(smoke_run), root / split, ExportOptions(split=split, logits=True, progress=False))
        probs_only = root / f"{split}_probs"
        probs_only.mkdir()
        for path in (root / split).iterdir():
            if path.name == "export.json" or path.name.endswith("_probs.nii.gz"):
                shutil.copy(path, probs_only / path.name)
    return root


def _probs(folder: Path, case_id: str) -> np.ndarray:
    return np.asarray(nib.load(str(folder / f"{case_id}_probs.nii.gz")).dataobj, dtype=np.float64)


def _nll(probs: np.ndarray, label: np.ndarray) -> float:
    p_true = np.take_along_axis(probs, label[..., None], axis=-1)[..., 0]
    return float(-np.log(np.clip(p_true, 1e-12, None)).mean())


def test_a_calibrator_fitted_on_probabilities_gives_the_same_maps_through_export_and_apply(
    smoke_run: Path, maps: Path, tmp_path: Path
) -> None:
    manifest = _manifest(smoke_run)
    cal = tmp_path / "cal"
    assert main(["calibrate", "fit", "--predictions", str(maps / "validation_probs"), "--manifest", manifest,
                 "--method", "vector", "--output", str(cal)]) == 0
    space = json.loads((cal / "calibrator.json").read_text())["input_space"]
    assert space == {"space": "log_probs", "fitted_on": "probs", "source_format": "segcalib", "prob_floor": 1e-12}
    assert main(["export", "--run", str(smoke_run), "--manifest", manifest, "--output", str(tmp_path / "exported"),
                 "--calibrator", str(cal)]) == 0
    for source in ("test", "test_probs"):  # logits maps, probability maps
        assert main(["calibrate", "apply", "--calibrator", str(cal), "--predictions", str(maps / source),
                     "--output", str(tmp_path / f"applied_{source}")]) == 0
    nll = {"uncalibrated": 0.0, "export": 0.0, "apply": 0.0}
    for case in load_manifest(manifest).labelled("test"):
        exported = _probs(tmp_path / "exported", case.case_id)
        for source in ("test", "test_probs"):
            np.testing.assert_allclose(_probs(tmp_path / f"applied_{source}", case.case_id), exported, atol=1e-5)
        label = read_volume(case.label, dtype=np.int64)[0]
        nll["uncalibrated"] += _nll(_probs(maps / "test", case.case_id), label)
        nll["export"] += _nll(exported, label)
        nll["apply"] += _nll(_probs(tmp_path / "applied_test_probs", case.case_id), label)
    print("test NLL", nll)  # the reproduction: export and apply now agree
    assert nll["export"] == pytest.approx(nll["apply"], abs=1e-5)


def test_a_logits_calibrator_refuses_probability_maps_and_leaves_the_folder(
    smoke_run: Path, maps: Path, tmp_path: Path, capsys
) -> None:
    manifest = _manifest(smoke_run)
    cal = tmp_path / "cal"
    assert main(["calibrate", "fit", "--predictions", str(maps / "validation"), "--manifest", manifest,
                 "--method", "vector", "--output", str(cal)]) == 0
    assert json.loads((cal / "calibrator.json").read_text())["input_space"]["space"] == "logits"
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = listing(out)
    capsys.readouterr()
    assert main(["calibrate", "apply", "--calibrator", str(cal), "--predictions", str(maps / "test_probs"),
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the maps are probabilities, but the calibrator" in err and "was fitted on logits" in err
    assert listing(out) == before


def test_refused_exports_leave_the_folder_and_the_corrected_rerun_works(
    smoke_run: Path, maps: Path, tmp_path: Path
) -> None:
    manifest = _manifest(smoke_run)
    out = tmp_path / "mc"
    assert main(["export", "--run", str(smoke_run), "--manifest", manifest, "--output", str(out),
                 "--mc-dropout", "4"]) == 2  # the smoke U-Net has no dropout
    assert listing(out) is None
    assert main(["export", "--run", str(smoke_run), "--manifest", manifest, "--output", str(out)]) == 0
    # calibrate apply with a calibrator of other classes: refused before export.json is written
    cal = tmp_path / "cal4"
    cal.mkdir()
    (cal / "calibrator.json").write_text(json.dumps({
        "format_version": 1, "method": "temperature", "classes": 4, "params": {"temperature": 1.5}, "tensors": []}))
    applied = tmp_path / "applied"
    assert main(["calibrate", "apply", "--calibrator", str(cal), "--predictions", str(maps / "test"),
                 "--output", str(applied)]) == 2
    assert listing(applied) is None
    (cal / "calibrator.json").write_text(json.dumps({
        "format_version": 1, "method": "temperature", "classes": 3, "params": {"temperature": 1.5}, "tensors": []}))
    assert main(["calibrate", "apply", "--calibrator", str(cal), "--predictions", str(maps / "test"),
                 "--output", str(applied)]) == 0


@pytest.mark.parametrize("source", ["test", "test_probs"])
def test_extreme_temperatures_give_one_hot_maps_or_exit_2_never_nan(
    maps: Path, tmp_path: Path, source: str, capsys
) -> None:
    cal = tmp_path / "cal"
    cal.mkdir()

    def write(t: float) -> None:
        (cal / "calibrator.json").write_text(json.dumps({
            "format_version": 1, "method": "temperature", "classes": 3, "params": {"temperature": t}, "tensors": [],
            "input_space": {"space": "log_probs"}}))

    write(1e-308)  # hand-edited: beyond float32; was all-NaN maps with exit 0, or exit 1
    capsys.readouterr()
    assert main(["calibrate", "apply", "--calibrator", str(cal), "--predictions", str(maps / source),
                 "--output", str(tmp_path / "a")]) == 2
    assert "parameter 'temperature' = 1e-308 is outside [1e-30, 1e+30]" in capsys.readouterr().err
    assert listing(tmp_path / "a") is None
    write(1e-30)  # valid and extreme: one-hot maps
    assert main(["calibrate", "apply", "--calibrator", str(cal), "--predictions", str(maps / source),
                 "--output", str(tmp_path / "b")]) == 0
    for path in (tmp_path / "b").glob("*_probs.nii.gz"):
        probs = np.asarray(nib.load(str(path)).dataobj)
        assert np.isfinite(probs).all() and set(np.unique(probs)) <= {0.0, 1.0}


@pytest.mark.parametrize("method, fitted_on", [("temperature", "validation"), ("dirichlet", "validation_probs"),
                                               ("boundary_temperature", "validation_probs")])
def test_export_and_apply_agree_for_other_calibrators(smoke_run: Path, maps: Path, tmp_path: Path, method: str,
                                                     fitted_on: str) -> None:
    manifest = _manifest(smoke_run)
    cal = tmp_path / "cal"
    assert main(["calibrate", "fit", "--predictions", str(maps / fitted_on), "--manifest", manifest,
                 "--method", method, "--output", str(cal)]) == 0
    assert main(["export", "--run", str(smoke_run), "--manifest", manifest, "--output", str(tmp_path / "exported"),
                 "--calibrator", str(cal)]) == 0
    sources = ["test"] + (["test_probs"] if fitted_on.endswith("_probs") else [])
    for source in sources:
        assert main(["calibrate", "apply", "--calibrator", str(cal), "--predictions", str(maps / source),
                     "--output", str(tmp_path / source)]) == 0
    for case in load_manifest(manifest).cases("test"):
        exported = _probs(tmp_path / "exported", case.case_id)
        for source in sources:
            np.testing.assert_allclose(_probs(tmp_path / source, case.case_id), exported, atol=1e-5)
