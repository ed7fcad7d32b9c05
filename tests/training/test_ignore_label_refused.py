"""``segcalib train`` does not train with nnU-Net's ignore label: a manifest that declares one is
refused before anything is built or written, naming the manifest and the label."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segcalib.config import load_config
from segcalib.errors import DataError
from segcalib.runs import RunDir
from segcalib.training import train
from tests.conftest import SMOKE_CONFIG
from tests.synthetic import write_nifti


def test_a_manifest_with_an_ignore_label_is_refused(tmp_path: Path) -> None:
    entries = []
    for i in range(3):
        label = np.zeros((16, 16, 16), np.uint8)
        label[4:8, 4:8, 4:8], label[10:12, 10:12, 10:12] = 1, 2
        write_nifti(tmp_path / f"img{i}.nii.gz", label.astype(np.float32))
        write_nifti(tmp_path / f"lab{i}.nii.gz", label)
        entries.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz"})
    manifest = tmp_path / "dataset.json"
    manifest.write_text(json.dumps({"labels": {"background": 0, "organ": 1, "ignore": 2}, "training": entries}))
    cfg = load_config(SMOKE_CONFIG, [f"data.manifest={manifest}"])
    with pytest.raises(DataError, match=r"dataset.json: label 'ignore' = 2: segcalib train does not train with "
                                        "nnU-Net's ignore label"):
        train(cfg, RunDir(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()
