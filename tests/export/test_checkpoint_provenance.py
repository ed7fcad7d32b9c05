"""Where the exported weights come from: a checkpoint of another run is refused unless asked
for (then its own config is used and recorded), an unfinished run is said so and recorded, and
inputs with another channel count than the network's stop before ``export.json`` is written."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from segcalib.cli import main
from segcalib.config import load_config
from segcalib.errors import RunError
from segcalib.inference.trained_model import load_trained_model
from tests.synthetic import blob_case, write_nifti

REPO_ROOT = Path(__file__).resolve().parents[2]
HOLD_AS_TRAIN = """
import sys, time
from segcalib.utils.locks import folder_lock
with folder_lock(sys.argv[1], command="train --run-dir " + sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def _manifest(run: Path) -> Path:
    return Path(load_config(run / "config.yaml").data.manifest)


def _copy_run(smoke_run: Path, dest: Path, overrides: list[str] | None = None, rewrite_checkpoints: bool = False) -> Path:
    """A copy of the smoke run whose config (and, if asked, checkpoints' config) has ``overrides``."""
    shutil.copytree(smoke_run, dest, ignore=shutil.ignore_patterns(".segcalib.lock"))
    cfg = load_config(dest / "config.yaml", overrides or [])
    (dest / "config.yaml").write_text(cfg.to_yaml())
    if rewrite_checkpoints:
        for path in (dest / "checkpoints").glob("*.pt"):
            state = torch.load(path, weights_only=True)
            state.update(config=cfg.to_dict(), config_hash=cfg.config_hash())
            torch.save(state, path)
    return dest


def _export(run: Path, out: Path, *extra: str) -> int:
    return main(["export", "--run", str(run), "--manifest", str(_manifest(run)), "--output", str(out), "--device", "cpu", *extra])


def test_a_checkpoint_of_another_run_is_refused_unless_allowed(smoke_run: Path, tmp_path: Path, capsys) -> None:
    other = _copy_run(smoke_run, tmp_path / "B", ["loss.name=ls", "inference.overlap=0.5"], rewrite_checkpoints=True)
    foreign = other / "checkpoints" / "best.pt"
    other_cfg = load_config(other / "config.yaml")
    out = tmp_path / "out"

    assert _export(smoke_run, out, "--checkpoint", str(foreign)) == 2
    err = capsys.readouterr().err
    assert f"segcalib: error: {foreign}: a checkpoint of another config (hash {other_cfg.config_hash()})" in err
    assert "changed: inference.overlap, loss.name" in err and "--allow-foreign-checkpoint" in err
    assert not (out / "export.json").exists()

    model = load_trained_model(smoke_run, str(foreign), "cpu", allow_foreign=True)
    assert model.cfg.loss.name == "ls" and model.window.overlap == 0.5  # the checkpoint's own settings
    assert _export(smoke_run, out, "--checkpoint", str(foreign), "--allow-foreign-checkpoint") == 0
    info = json.loads((out / "export.json").read_text())
    assert info["status"] == "complete" and info["foreign_checkpoint"] is True and info["members"][0]["foreign_checkpoint"] is True
    assert info["loss"] == "ls" and info["config_hash"] == other_cfg.config_hash()
    assert info["checkpoint_config"] == other_cfg.to_dict() and info["checkpoint"] == str(foreign.resolve())


def test_own_checkpoints_are_not_foreign_after_a_resume_changed_the_epochs(smoke_run: Path, tmp_path: Path, caplog) -> None:
    """``--resume`` may raise train.epochs (config.yaml rewritten, best.pt kept): still this run's,
    but unfinished until the new last epoch: a warning naming the epoch, and the record says so."""
    run = _copy_run(smoke_run, tmp_path / "A", ["train.epochs=3"])
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="segcalib"):
        assert _export(run, out) == 0
    assert f"{run}: the run is unfinished (last checkpoint at epoch 1 of 3); exporting best.pt from epoch 1" in caplog.text
    info = json.loads((out / "export.json").read_text())
    assert info["run_finished"] is False and info["checkpoint_epoch"] == 1 and info["foreign_checkpoint"] is False
    assert info["members"][0]["run_finished"] is False
    assert "checkpoint_config" not in info


def test_a_finished_run_exports_without_a_warning(smoke_run: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="segcalib"):
        model = load_trained_model(smoke_run, "best", "cpu")
    assert model.run_finished is True and model.record() == {"run_finished": True, "foreign_checkpoint": False}
    assert "unfinished" not in caplog.text


def test_a_run_held_by_a_train_command_is_unfinished_until_the_holder_dies(smoke_run: Path, tmp_path: Path, caplog) -> None:
    run = _copy_run(smoke_run, tmp_path / "A")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("RANK", None)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AS_TRAIN, str(run)], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with caplog.at_level(logging.WARNING, logger="segcalib"):
            assert load_trained_model(run, "last", "cpu").run_finished is False
        assert f"`segcalib train --run-dir {run} (pid {holder.pid})` is training it now" in caplog.text
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (run / ".segcalib.lock").exists()  # kill -9 leaves the record of a dead holder
    assert load_trained_model(run, "last", "cpu").run_finished is True


def test_a_manifest_with_another_channel_count_exits_2_before_export_json(smoke_run: Path, tmp_path: Path, capsys) -> None:
    entries = []
    for i in range(2):
        image, label = blob_case((20, 24, 16), seed=i)
        write_nifti(tmp_path / "data" / f"two_{i}.nii.gz", np.stack([image, image * 0.5], -1))
        write_nifti(tmp_path / "data" / f"two_{i}_label.nii.gz", label)
        entries.append({"image": f"./two_{i}.nii.gz", "label": f"./two_{i}_label.nii.gz"})
    manifest = tmp_path / "data" / "dataset.json"
    manifest.write_text(json.dumps({"name": "two", "modality": {"0": "T1", "1": "T2"},
                                    "labels": {"0": "background", "1": "a", "2": "b"}, "test": entries}))
    out = tmp_path / "out"
    argv = ["export", "--run", str(smoke_run), "--manifest", str(manifest), "--output", str(out), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"segcalib: error: {manifest}: its cases have 2 channel(s) (modalities) but the model of " in err
    assert "takes 1" in err and "Traceback" not in err
    assert not (out / "export.json").exists()


def test_a_checkpoint_with_only_weights_exits_2_naming_the_key(smoke_run: Path, tmp_path: Path, capsys) -> None:
    weights = torch.load(smoke_run / "checkpoints" / "best.pt", weights_only=True)["model"]
    path = tmp_path / "weights_only.pt"
    torch.save({"model": weights}, path)
    assert _export(smoke_run, tmp_path / "out", "--checkpoint", str(path)) == 2
    err = capsys.readouterr().err
    assert f"segcalib: error: {path}: not a usable segcalib checkpoint for export: key 'epoch' is missing" in err
    with pytest.raises(RunError, match="key 'epoch' is missing"):
        load_trained_model(smoke_run, str(path), "cpu")
