"""``segcalib nnunet env``: the export line points at the folder nnU-Net imports the trainers from."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import segcalib
from segcalib.cli import main


def test_env_prints_the_export_line_of_the_installed_trainer_folder(capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("nnunetv2")
    assert main(["nnunet", "env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    folder = Path(segcalib.__file__).resolve().parent / "integrations" / "nnunet" / "ext_trainers"
    assert lines[0] == f"export nnUNet_extTrainer={folder}"
    assert (folder / "segcalib_nnunet_trainers.py").is_file()
    assert len(lines) == 2 and lines[1].startswith("# then: nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerSegcalibMbLS --npz")
    assert lines[1].endswith("keep nnUNet_extTrainer set for nnUNetv2_predict: it imports the trainer again")
    for name in ("nnUNetTrainerSegcalibCALS", "nnUNetTrainerSegcalibNACL", "nnUNetTrainerSegcalibCE",
                 "nnUNetTrainerSegcalibSoftL1ACEDiceCE", "SEGCALIB_LOSS"):
        assert name in lines[1]

    assert main(["nnunet", "env", "--path"]) == 0
    assert capsys.readouterr().out == f"{folder}\n"


def test_env_without_nnunetv2_is_a_user_error(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nnunetv2" else real(name, *a))
    assert main(["nnunet", "env"]) == 2
    assert "pip install 'segcalib[nnunet]'" in capsys.readouterr().err


def test_help_does_not_import_nnunetv2_or_the_trainers() -> None:
    import subprocess
    import sys

    code = ("import sys; from segcalib.cli import build_parser; build_parser(); "
            "print(any(m.startswith(('nnunetv2', 'segcalib.integrations')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(segcalib.__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"
