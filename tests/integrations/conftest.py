"""nnU-Net's folders in a temporary place, and trainers built on the minimal plans (CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.integrations.nnunet_plans import DATASET, dataset_json, plans


@pytest.fixture
def nnunet_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``nnUNet_results`` / ``nnUNet_preprocessed`` under ``tmp_path``; the preprocessed folder
    holds one placeholder file, which is all ``initialize`` reads (the dataset class by file ending)."""
    pytest.importorskip("nnunetv2")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path / name))
    data = tmp_path / "nnUNet_preprocessed" / DATASET / "nnUNetPlans_2d"
    data.mkdir(parents=True)
    (data / "placeholder.b2nd").write_bytes(b"")
    for name in ("SEGCALIB_LOSS", "SEGCALIB_LOSS_PARAMS", "nnUNet_extTrainer"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.fixture
def make_trainer(nnunet_dirs: Path):
    """``make_trainer(cls, ignore=False, initialize=True)``: a trainer on the minimal plans, on the CPU."""

    def make(cls, ignore: bool = False, regions: bool = False, initialize: bool = True):
        trainer = cls(plans(), "2d", 0, dataset_json(ignore=ignore, regions=regions), torch.device("cpu"))
        if initialize:
            trainer.initialize()
        return trainer

    return make
