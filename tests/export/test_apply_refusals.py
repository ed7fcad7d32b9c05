"""Issue 21, items 2, 4 and 7 on ``calibrate apply`` without a model: refusals leave the output
folder as it was (also when a later case fails), written maps are checked, extreme parameters give
one-hot maps or exit 2, and an error never shares a line with a progress bar in a log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segcalib.cli import main
from segcalib.errors import DataError
from segcalib.export.writers import check_maps, output_paths, write_probability_maps
from tests.synthetic import write_nifti

SHAPE = (6, 5, 4)


def _probs(seed: int) -> np.ndarray:
    z = np.random.default_rng(seed).normal(size=(*SHAPE, 3)) * 2
    p = np.exp(z - z.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def _nnunet_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i in range(2):
        probs = _probs(i)
        np.savez_compressed(folder / f"c{i}.npz", probabilities=np.moveaxis(probs, -1, 0).transpose(0, 3, 2, 1))
        write_nifti(folder / f"c{i}.nii.gz", probs.argmax(-1).astype(np.uint8))
    return folder


def _calibrator(folder: Path, temperature: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "calibrator.json").write_text(json.dumps({
        "format_version": 1, "method": "temperature", "classes": 3, "tensors": [],
        "params": {"temperature": temperature, "seed": 0, "max_voxels": 1000, "max_iter": 100}}))
    return folder


def _listing(folder: Path) -> dict[str, bytes] | None:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else None


def test_a_hand_edited_tiny_temperature_on_an_nnunet_folder(tmp_path: Path, capsys) -> None:
    maps = _nnunet_folder(tmp_path / "nnunet")
    out = tmp_path / "out"
    assert main(["calibrate", "apply", "--calibrator", str(_calibrator(tmp_path / "c1", 1e-308)),
                 "--predictions", str(maps), "--output", str(out)]) == 2  # was: all-NaN maps, exit 0
    assert "parameter 'temperature' = 1e-308 is outside" in capsys.readouterr().err and _listing(out) is None
    assert main(["calibrate", "apply", "--calibrator", str(_calibrator(tmp_path / "c2", 1e-30)),
                 "--predictions", str(maps), "--output", str(out)]) == 0
    for i in range(2):
        got = np.asarray(nib.load(str(out / f"c{i}_probs.nii.gz")).dataobj)
        np.testing.assert_array_equal(got, np.eye(3, dtype=np.float32)[_probs(i).argmax(-1)])  # one-hot


def test_unknown_calibrator_parameters_are_refused(tmp_path: Path, capsys) -> None:
    cal = _calibrator(tmp_path / "cal", 1.5)
    document = json.loads((cal / "calibrator.json").read_text())
    document["params"]["temprature"] = 0.5
    (cal / "calibrator.json").write_text(json.dumps(document))
    assert main(["calibrate", "apply", "--calibrator", str(cal), "--predictions", str(_nnunet_folder(tmp_path / "m")),
                 "--output", str(tmp_path / "out")]) == 2
    assert "unknown parameter 'temprature'; did you mean 'temperature'?" in capsys.readouterr().err


def test_a_later_case_that_fails_puts_the_folder_back_and_the_error_has_its_own_line(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    write_nifti(maps / "a.nii.gz", _probs(0))
    bad = _probs(1)
    bad[2, 2, 2, 1] = np.nan
    write_nifti(maps / "b.nii.gz", bad)  # read after a's maps are written
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    before = _listing(out)
    run = subprocess.run([sys.executable, "-m", "segcalib", "calibrate", "apply", "--calibrator",
                          str(_calibrator(tmp_path / "cal", 1.5)), "--predictions", str(maps), "--output", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 2
    errors = [line for line in run.stderr.split("\n") if "segcalib: error:" in line]  # a "\r" is no new line
    assert len(errors) == 1 and errors[0].startswith("segcalib: error:") and "b.nii.gz: holds NaN" in errors[0]
    assert _listing(out) == before  # a's maps and export.json are gone again


def test_writers_check_every_map_before_writing(tmp_path: Path) -> None:
    reference = write_nifti(tmp_path / "ref.nii.gz", np.zeros(SHAPE, dtype=np.float32))
    maps = np.moveaxis(_probs(0), -1, 0).copy()
    maps[0, 1, 1, 1] = np.nan
    paths = output_paths(tmp_path / "out", "case_7")
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match=r"case case_7: the calibrated map has 1 NaN or infinite value\(s\), made by "
                                        r"calibrator 'x' \(temperature = 1e-30\)"):
        write_probability_maps(maps, reference, paths, producer=lambda: "calibrator 'x' (temperature = 1e-30)")
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(DataError, match=r"case 9: the calibrated map has classes that sum to 1 only within 0.5"):
        check_maps(np.full((2, 3, 3, 3), 0.75, dtype=np.float32), "case 9")
    check_maps(np.full((4, 3, 3, 3), 0.25, dtype=np.float32), "case 9")  # sums to 1: fine
