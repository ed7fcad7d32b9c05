"""The command line: exit 0 on success, 2 with one clear message for bad input, 1 for bugs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from segcalib.cli import main
from tests.conftest import REPO_ROOT, SMOKE_CONFIG
from tests.synthetic import make_dataset, write_nifti


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _user_error(capsys, *args: str, expect: str) -> str:
    code, _, err = _run(capsys, *args)
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("segcalib: error:")
    assert expect in err, err
    return err


def test_version_and_module_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "segcalib", "--version"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0 and result.stdout.startswith("segcalib ")


def test_data_check_prints_a_summary(capsys) -> None:
    code, out, _ = _run(capsys, "data", "check", os.path.join(REPO_ROOT, "data_manifests", "hippocampus_demo.json"))
    assert code == 0
    assert "training 28, validation 6, test 6" in out and "voxels per label" in out and "ok:" in out


def test_data_check_accepts_the_original_msd_dataset_json(capsys) -> None:
    code, out, _ = _run(capsys, "data", "check", os.path.join(REPO_ROOT, "data", "msd_hippocampus", "dataset.json"))
    assert code == 0 and "training 96, validation 24, test 0" in out and "seeded split" in out


def test_data_check_bad_input_exits_2_naming_case_and_file(capsys, tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path, n_cases=3, splits={"training": 3})
    (tmp_path / "labelsTr" / "case_002.nii.gz").unlink()
    _user_error(capsys, "data", "check", str(manifest), expect="case case_002: label")


def test_usage_errors_exit_2(capsys) -> None:
    assert main(["frobnicate"]) == 2
    assert main(["train"]) == 2  # neither --config nor --resume
    assert main(["export", "--run", "x"]) == 2  # missing required options
    capsys.readouterr()


@pytest.mark.parametrize(
    "text, expect",
    [
        ("name: x\ndata: {manifest: m.json}\ntrain: {epochs: -1}\n", "train.epochs"),
        ("name: x\ndata: {manifest: m.json, patchsize: [1]}\n", "data.patchsize: unknown key"),
        ("name: !!python/object/apply:os.system ['echo hi']\n", "invalid YAML"),
    ],
)
def test_bad_configs_exit_2_naming_the_key(capsys, tmp_path: Path, text: str, expect: str) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    err = _user_error(capsys, "train", "--config", str(path), "--run-dir", str(tmp_path / "run"), expect=expect)
    assert str(path) in err
    assert not (tmp_path / "run").exists()


def test_a_folder_or_unreadable_file_as_config_exits_2(capsys, tmp_path: Path) -> None:
    _user_error(capsys, "train", "--config", str(tmp_path), "--run-dir", str(tmp_path / "run"), expect="is not a file")
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "locked.yaml"
        locked.write_text("name: x\n")
        locked.chmod(0)
        _user_error(capsys, "train", "--config", str(locked), "--run-dir", str(tmp_path / "run"), expect="cannot be read")


def test_gpu_out_of_memory_exits_2_with_advice(capsys, monkeypatch) -> None:
    import segcalib.cli.data_cmd as data_cmd

    def out_of_memory(args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(data_cmd, "run_check", out_of_memory)
    _user_error(capsys, "data", "check", "x.json", expect="the GPU ran out of memory")


def test_bad_override_exits_2(capsys, tmp_path: Path) -> None:
    _user_error(capsys, "train", "--config", SMOKE_CONFIG, "--run-dir", str(tmp_path / "r"),
                "--set", "loss.name=nope", expect="loss.name: unknown loss 'nope'")


def test_data_errors_stop_training_before_any_work(capsys, tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path / "data", n_cases=3, splits={"training": 2, "validation": 1, "test": 0})
    image = tmp_path / "data" / "imagesTr" / "case_001.nii.gz"
    write_nifti(image, np.full((20, 24, 16), np.nan, np.float32))
    _user_error(capsys, "train", "--config", SMOKE_CONFIG, "--run-dir", str(tmp_path / "run"),
                "--set", f"data.manifest={manifest}", expect="case case_001: image")
    assert not (tmp_path / "run").exists()


def test_existing_run_folder_is_refused(capsys, smoke_run: Path) -> None:
    _user_error(capsys, "train", "--config", SMOKE_CONFIG, "--run-dir", str(smoke_run), expect="--resume")


def test_missing_run_and_predictions(capsys, tmp_path: Path) -> None:
    manifest = os.path.join(REPO_ROOT, "data_manifests", "hippocampus_smoke.json")
    _user_error(capsys, "export", "--run", str(tmp_path / "nope"), "--manifest", manifest, "--output", str(tmp_path / "o"),
                expect="run folder does not exist")
    _user_error(capsys, "evaluate", "--predictions", str(tmp_path / "nope"), "--manifest", manifest, "--output",
                str(tmp_path / "o"), expect="predictions folder does not exist")
    _user_error(capsys, "report", str(tmp_path / "nope"), "--output", str(tmp_path / "o"), expect="no such report")


def test_malicious_checkpoint_is_refused_and_never_runs(capsys, smoke_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Payload(), "epoch": 1}, run / "checkpoints" / "best.pt")
    manifest = os.path.join(REPO_ROOT, "data_manifests", "hippocampus_smoke.json")
    _user_error(capsys, "export", "--run", str(run), "--manifest", manifest, "--output", str(tmp_path / "o"),
                expect="refused to load")
    assert not marker.exists()


def test_truncated_checkpoint_is_a_clear_error(capsys, smoke_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    data = (run / "checkpoints" / "best.pt").read_bytes()
    (run / "checkpoints" / "best.pt").write_bytes(data[: len(data) // 3])
    manifest = os.path.join(REPO_ROOT, "data_manifests", "hippocampus_smoke.json")
    _user_error(capsys, "export", "--run", str(run), "--manifest", manifest, "--output", str(tmp_path / "o"),
                expect="not a readable checkpoint")


def test_bugs_exit_1_with_a_traceback(capsys, monkeypatch) -> None:
    import segcalib.cli.data_cmd as data_cmd

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(data_cmd, "run_check", broken)
    with pytest.raises(ZeroDivisionError):
        main(["data", "check", "x.json"])


def test_bugs_exit_1_from_the_console(tmp_path: Path) -> None:
    code = "import segcalib.cli.data_cmd as d; d.run_check = lambda a: 1 / 0; from segcalib.cli import main; raise SystemExit(main(['data', 'check', 'x']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 1 and "ZeroDivisionError" in result.stderr
