"""An output or run folder that cannot be one (a file, under a file, not writable) is refused
before any work, naming the option: ``--output`` / ``--run-dir``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import segcalib.reports.evaluation as evaluation_module
import segcalib.utils.files as files_module
from segcalib.cli import main
from segcalib.data import load_manifest
from segcalib.errors import RunError
from segcalib.reports import evaluate
from segcalib.utils.files import check_output_folder
from tests.conftest import SMOKE_CONFIG
from tests.mounts import small_filesystem
from tests.synthetic import make_dataset, write_nifti


@pytest.fixture
def predictions(tmp_path: Path) -> tuple[Path, Path]:
    """A manifest and a folder of perfect probability maps for its one test case."""
    manifest = make_dataset(tmp_path / "data", 2, (10, 10, 6), None, {"training": 1, "test": 1})
    case = load_manifest(manifest).cases("test")[0]
    label = np.asarray(nib.load(str(case.label)).dataobj).astype(np.int64)
    write_nifti(tmp_path / "pred" / f"{case.case_id}_probs.nii.gz", np.eye(3, dtype=np.float32)[label])
    return manifest, tmp_path / "pred"


def test_a_file_or_a_folder_under_a_file_is_refused_naming_the_option(tmp_path: Path) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    for path in (blocker, blocker / "out", blocker / "a" / "b"):
        with pytest.raises(RunError) as info:
            check_output_folder(path, "--output")
        assert str(info.value) == f"--output {path}: {blocker} exists and is not a folder; choose another --output"
    assert check_output_folder(tmp_path / "new" / "deeper", "--output") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # a check: nothing is made


def test_a_folder_without_write_permission_is_refused(tmp_path: Path, monkeypatch) -> None:
    """Tests run as root, who may write anywhere: the permission answer is simulated here (the
    read-only file system below is real)."""
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(files_module.os, "access", lambda path, mode: Path(path) != tmp_path / "out")
    with pytest.raises(RunError) as info:
        check_output_folder(tmp_path / "out", "--run-dir")
    assert str(info.value) == f"--run-dir {tmp_path / 'out'}: cannot write there: no write permission; choose another --run-dir"
    monkeypatch.setattr(files_module.os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(RunError, match=r"cannot write there \(it would be made in .*\): no write permission"):
        check_output_folder(tmp_path / "new" / "out", "--output")


def test_a_read_only_file_system_is_refused(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "fs", 1024 * 1024) as fs:
        (fs / "existing").mkdir()
        remount = subprocess.run(["mount", "-o", "remount,ro", str(fs)], capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount the tmpfs read-only: {remount.stderr.strip()}")
        with pytest.raises(RunError) as info:
            check_output_folder(fs / "existing", "--output")
        assert str(info.value) == f"--output {fs / 'existing'}: cannot write there: a read-only file system; choose another --output"
        with pytest.raises(RunError, match=f"cannot write there \\(it would be made in {fs}\\): a read-only file system"):
            check_output_folder(fs / "new" / "out", "--output")


def test_every_writing_command_refuses_a_file_as_its_folder(tmp_path: Path, predictions, capsys) -> None:
    manifest, pred = predictions
    blocker = tmp_path / "taken.txt"
    blocker.write_text("x")
    out = blocker / "out"
    commands = {
        "--output": [
            ["export", "--run", str(tmp_path / "no_run"), "--manifest", str(manifest), "--output", str(out)],
            ["evaluate", "--predictions", str(pred), "--manifest", str(manifest), "--output", str(out)],
            ["report", str(tmp_path / "none.json"), "--output", str(blocker)],
        ],
        "--run-dir": [["train", "--config", SMOKE_CONFIG, "--run-dir", str(out)]],
    }
    for option, lines in commands.items():
        for argv in lines:
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert f"segcalib: error: {option} " in err and f"{blocker} exists and is not a folder" in err, err
            assert "Traceback" not in err
    assert blocker.read_text() == "x"


def test_export_into_a_read_only_file_system_exits_2_naming_it(tmp_path: Path, capsys) -> None:
    with small_filesystem(tmp_path / "fs", 1024 * 1024, read_only=True) as fs:
        argv = ["export", "--run", str(tmp_path / "no_run"), "--manifest", "m.json", "--output", str(fs / "out")]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"--output {fs / 'out'}: cannot write there (it would be made in {fs}): a read-only file system" in err


def test_evaluate_checks_its_output_before_computing_anything(tmp_path: Path, predictions, monkeypatch) -> None:
    manifest, pred = predictions
    blocker = tmp_path / "report.txt"
    blocker.write_text("x")

    def computed(*args, **kwargs):
        raise AssertionError("a case was evaluated before the output folder was checked")

    monkeypatch.setattr(evaluation_module, "evaluate_case", computed)
    for output in (blocker, blocker / "report"):
        with pytest.raises(RunError, match=f"report folder {output}: {blocker} exists and is not a folder"):
            evaluate(pred, manifest, output, device="cpu")
