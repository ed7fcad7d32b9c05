"""Training: smoke run, exact resume after kill -9, CALS multipliers, DDP with gloo, NaN stop."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from segcalib.config import load_config
from segcalib.errors import RunError
from segcalib.losses.base import CalibrationLoss
from segcalib.runs import RunDir
from segcalib.training import TrainingDiverged, train
from segcalib.training.trainer import build_loss_for
from segcalib.runs.checkpoint import load_checkpoint
from tests.conftest import REPO_ROOT, SMOKE_CONFIG

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def _cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "segcalib", *args], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def test_smoke_training_lowers_the_loss(smoke_run: Path, tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    summary = train(load_config(SMOKE_CONFIG), run, progress=False)
    rows = _rows(run.root)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    for column in ("train_ce", "val_dice_fg_mean", "val_dice_Anterior", "val_ece", "lr", "seconds"):
        assert column in rows[0]
    state = load_checkpoint(run.last)
    assert state["epoch"] == 2 and state["num_classes"] == 3 and state["config"]["name"] == "smoke"
    assert run.best.exists() and (run.root / "config.yaml").exists()
    assert any(run.tensorboard.glob("events.out.tfevents.*"))
    assert summary.best_epoch in (1, 2)


def test_non_empty_run_folder_is_refused(smoke_run: Path) -> None:
    with pytest.raises(RunError, match="not empty; add --resume"):
        train(load_config(SMOKE_CONFIG), RunDir(smoke_run), progress=False)


def test_resume_refuses_a_changed_config(smoke_run: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(smoke_run, copy)
    with pytest.raises(RunError, match="changed: train.lr"):
        train(load_config(SMOKE_CONFIG, ["train.epochs=2", "train.lr=0.1"]), RunDir(copy), resume=True, progress=False)

def _as_written_before(run: Path, key: tuple[str, str]) -> None:
    """Make ``run`` look like one written by a segcalib whose schema did not have ``key`` yet:
    gone from config.yaml and from every checkpoint's config (and so another config hash)."""
    import hashlib
    import json

    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved[key[0]][key[1]]
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    for path in (run / "checkpoints").glob("*.pt"):
        state = torch.load(path, weights_only=True)
        state["config"] = saved
        state["config_hash"] = hashlib.sha256(json.dumps(saved, sort_keys=True).encode()).hexdigest()[:16]
        torch.save(state, path)


def test_a_run_written_before_a_schema_key_was_added_resumes_and_exports(smoke_run: Path, tmp_path: Path) -> None:
    """Upgrading segcalib must not strand an unfinished run: a key added to the schema since the
    run was written (here ``train.amp_on_cpu``) is its default, not a change; setting it is one."""
    import shutil

    from segcalib.experiment import train_or_reuse
    from segcalib.inference.trained_model import load_trained_model

    copy = tmp_path / "old"
    shutil.copytree(smoke_run, copy, ignore=shutil.ignore_patterns(".segcalib.lock"))
    _as_written_before(copy, ("train", "amp_on_cpu"))
    assert "amp_on_cpu" not in (copy / "config.yaml").read_text()

    model = load_trained_model(copy, "last", "cpu")  # not "a checkpoint of another config"
    assert model.cfg.train.amp_on_cpu is False and model.cfg.name == "smoke"
    with pytest.raises(RunError, match=r"another config \(changed: train.amp_on_cpu\)"):
        train_or_reuse(SMOKE_CONFIG, copy, ["train.epochs=2", "train.amp_on_cpu=true"], progress=False)
    assert train_or_reuse(SMOKE_CONFIG, copy, ["train.epochs=2"], progress=False) == 2  # resumed, not refused
    assert [int(r["epoch"]) for r in _rows(copy)] == [1, 2]
    assert load_checkpoint(RunDir(copy).last)["config"]["train"]["amp_on_cpu"] is False



def _native_bf16() -> bool:
    from segcalib.utils.devices import cpu_has_native_bf16

    return cpu_has_native_bf16()


@pytest.mark.parametrize(
    "amp_on_cpu",
    [False, pytest.param(True, marks=pytest.mark.skipif(not _native_bf16(), reason="needs a CPU with native bf16"))],
)
def test_kill_then_resume_runs_every_epoch_once_and_matches(amp_on_cpu: bool, tmp_path: Path) -> None:
    """kill -9 during training, then --resume: every epoch runs once and the weights and losses
    match an uninterrupted run, in float32 and under CPU bf16 autocast (``train.amp_on_cpu``)."""
    args = ["--config", SMOKE_CONFIG, "--set", "train.epochs=3", "--set", "train.iterations_per_epoch=6", "--no-progress",
            "--set", f"train.amp_on_cpu={str(amp_on_cpu).lower()}"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "segcalib", "train", "--run-dir", str(killed), *args],
        cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (killed / "checkpoints" / "last.pt").exists():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # a temporary file may remain after kill -9, but every final file is complete
    for path in (killed / "checkpoints").glob("*.pt"):
        assert load_checkpoint(path)["epoch"] >= 1
    done = int(load_checkpoint(killed / "checkpoints" / "last.pt")["epoch"])
    assert 1 <= done <= 3
    resumed = _cli("train", "--run-dir", str(killed), "--resume", *args)
    assert resumed.returncode == 0, resumed.stderr
    finished = _cli("train", "--run-dir", str(straight), *args)
    assert finished.returncode == 0, finished.stderr
    assert [int(r["epoch"]) for r in _rows(killed)] == [1, 2, 3]
    a, b = load_checkpoint(killed / "checkpoints" / "last.pt"), load_checkpoint(straight / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    assert a["config"]["train"]["amp_on_cpu"] is b["config"]["train"]["amp_on_cpu"] is amp_on_cpu
    for key, value in a["model"].items():
        assert torch.allclose(value, b["model"][key], atol=1e-5, rtol=1e-4), key
    losses_a = [float(r["train_loss"]) for r in _rows(killed)]
    losses_b = [float(r["train_loss"]) for r in _rows(straight)]
    assert losses_a == pytest.approx(losses_b, rel=1e-4)
    # resuming a finished run does nothing
    again = _cli("train", "--run-dir", str(killed), "--resume", *args)
    assert again.returncode == 0 and len(_rows(killed)) == 3


def test_cals_multipliers_move(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "cals")
    cfg = load_config(SMOKE_CONFIG, ["loss.name=cals", "loss.margin=2"])
    train(cfg, run, progress=False)
    state = load_checkpoint(run.last)["loss"]
    assert state["lambdas"].shape == (3,)
    assert not torch.allclose(state["lambdas"], torch.full((3,), 1e-6))
    row = _rows(run.root)[-1]
    assert "lambda_0" in row and "rho_0" in row and "train_penalty" in row


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["crac", "hardl1ace_dice", "softl1ace_dice"])
def test_calibration_losses_train_on_the_smoke_data(loss: str, tmp_path: Path) -> None:
    """A short run of each newer calibration loss: finite, lower training loss in epoch 2; CRaC's
    per-(region, class) multipliers move on the validation data and are logged and checkpointed."""
    run = RunDir(tmp_path / loss)
    train(load_config(SMOKE_CONFIG, [f"loss.name={loss}"]), run, progress=False)
    rows = _rows(run.root)
    losses = [float(r["train_loss"]) for r in rows]
    assert all(math.isfinite(v) for v in losses) and losses[1] < losses[0]
    if loss == "crac":
        state = load_checkpoint(run.last)["loss"]
        assert state["lambdas"].shape == (2, 3) and int(state["epoch"]) == 2
        assert (state["lambdas"] > 1e-6).any()
        assert {"lambda_boundary_0", "lambda_interior_2", "rho_interior_1", "train_penalty"} <= set(rows[-1])
    else:
        assert {"train_ace", "train_dice"} <= set(rows[-1])


@pytest.mark.slow
def test_2d_training_updates_crac_on_2d_slices(tmp_path: Path, monkeypatch) -> None:
    """In 2D mode the adaptive update sees the validation volumes as batches of slices along
    ``data.slice_axis`` (the images the loss trains on), not as 3D volumes."""
    import segcalib.training.trainer as trainer

    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    build = trainer.build_loss_for

    def spying_build(cfg, num_classes):
        loss = build(cfg, num_classes)
        accumulate = loss.accumulate
        loss.accumulate = lambda z, y: (seen.append((tuple(z.shape), tuple(y.shape))), accumulate(z, y))[1]
        return loss

    monkeypatch.setattr(trainer, "build_loss_for", spying_build)
    cfg = load_config(SMOKE_CONFIG, ["loss.name=crac", "data.mode=2d", "data.slice_axis=1", "data.patch_size=[32,32]",
                                     "data.samples_per_volume=2", "train.epochs=1", "train.iterations_per_epoch=2"])
    train(cfg, RunDir(tmp_path / "crac2d"), progress=False)
    assert seen and all(len(z) == 4 and len(y) == 4 and z[0] == y[0] and y[1] == 1 for z, y in seen)
    assert int(load_checkpoint(RunDir(tmp_path / "crac2d").last)["loss"]["epoch"]) == 1


def test_loss_spacing_comes_from_the_resampled_data() -> None:
    cfg = load_config(SMOKE_CONFIG, ["loss.name=crac", "data.spacing=[1.0,1.0,1.5]"])
    assert build_loss_for(cfg, 3).spacing == (1.0, 1.0, 1.5)
    assert build_loss_for(load_config(SMOKE_CONFIG, ["loss.name=crac"]), 3).spacing is None  # the data's own: 1 mm
    given = load_config(SMOKE_CONFIG, ["loss.name=crac", "loss.spacing=[2.0,2.0,2.0]", "data.spacing=[1.0,1.0,1.5]"])
    assert build_loss_for(given, 3).spacing == (2.0, 2.0, 2.0)
    assert not hasattr(build_loss_for(load_config(SMOKE_CONFIG, ["data.spacing=[1.0,1.0,1.5]"]), 3), "spacing")


class _NanAfterFirstEpoch(CalibrationLoss):
    """CE that turns NaN from the 9th training call on (the smoke config has 8 steps per epoch)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(logits, target.reshape(logits.shape[0], *logits.shape[2:]).long())
        self.last_components = {"ce": loss.detach()}
        return loss * float("nan") if self.calls > 8 and self.training else loss


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch) -> None:
    import segcalib.training.trainer as trainer

    monkeypatch.setattr(trainer, "build_loss_for", lambda cfg, num_classes: _NanAfterFirstEpoch())
    run = RunDir(tmp_path / "nan")
    cfg = load_config(SMOKE_CONFIG, ["train.epochs=3"])
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 1: the loss is nan.*last good checkpoint .*epoch 1"):
        train(cfg, run, progress=False)
    state = load_checkpoint(run.last)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert [int(r["epoch"]) for r in _rows(run.root)] == [1]


def test_two_process_ddp_with_gloo(tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "segcalib", "train", "--config", SMOKE_CONFIG, "--run-dir", str(run), "--no-progress",
         "--set", "train.iterations_per_epoch=3"],
        cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert rows[-1]["val_dice_fg_mean"] != ""
    assert result.stdout.count("run folder:") == 1  # only rank 0 reports
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2


def test_2d_slices_train_and_export_whole_volumes(tmp_path: Path) -> None:
    import nibabel as nib
    import numpy as np

    from segcalib.data import load_manifest
    from segcalib.export import ExportOptions, export

    run = RunDir(tmp_path / "run2d")
    cfg = load_config(SMOKE_CONFIG, ["data.mode=2d", "data.patch_size=[32,48]", "data.samples_per_volume=4",
                                     "train.batch_size=4", "train.epochs=1", "train.iterations_per_epoch=4"])
    train(cfg, run, progress=False)
    assert "val_dice_fg_mean" in _rows(run.root)[-1]
    out = tmp_path / "export"
    export(run.root, cfg.data.manifest, out, ExportOptions())
    (case,) = load_manifest(cfg.data.manifest).cases("test")
    probs = nib.load(str(out / f"{case.case_id}_probs.nii.gz"))
    image = nib.load(str(case.images[0]))
    assert probs.shape == image.shape + (3,) and np.allclose(probs.affine, image.affine)
    assert np.abs(np.asarray(probs.dataobj).sum(-1) - 1).max() < 1e-5


@pytest.mark.parametrize("native", [True, False])
def test_amp_on_cpu_trains_under_bf16_autocast_only_where_the_cpu_has_bf16(native: bool, tmp_path: Path, monkeypatch,
                                                                          caplog) -> None:
    """``train.amp_on_cpu``: the training forward runs under CPU bf16 autocast (its outputs bf16, the
    loss finite and falling) on a CPU with native bf16; elsewhere in float32, with a warning. Off by
    default: CPU runs stay float32."""
    import segcalib.training.trainer as trainer_module

    seen: list[torch.dtype] = []
    real_autocast = trainer_module.Trainer._autocast

    def recording_autocast(self):
        context = real_autocast(self)
        seen.append(getattr(context, "fast_dtype", torch.float32))
        return context

    monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(trainer_module.Trainer, "_autocast", recording_autocast)
    run = RunDir(tmp_path / "bf16")
    with caplog.at_level("WARNING", logger="segcalib"):
        train(load_config(SMOKE_CONFIG, ["train.amp_on_cpu=true", "train.device=cpu"]), run, progress=False)
    losses = [float(r["train_loss"]) for r in _rows(run.root)]
    assert all(math.isfinite(v) for v in losses) and losses[1] < losses[0]
    assert seen and set(seen) == {torch.bfloat16 if native else torch.float32}
    assert ("no native bf16" in caplog.text) is not native
    seen.clear()
    train(load_config(SMOKE_CONFIG, ["train.device=cpu"]), RunDir(tmp_path / "default"), progress=False)
    assert seen and set(seen) == {torch.float32}
