"""Training on a full disk, with a malformed checkpoint to resume, or without training cases:
exit 2 with one message naming the folder / file / key, and the last good checkpoint intact."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from segcalib.cli import main
from segcalib.errors import ResourceError, RunError
from segcalib.training.metrics_log import MetricsLog
from tests.conftest import SMOKE_CONFIG
from tests.mounts import fill, small_filesystem


def test_a_real_disk_that_fills_up_during_training_exits_2_and_keeps_the_last_checkpoint(
    smoke_run: Path, tmp_path: Path, capsys
) -> None:
    """A tmpfs with room for 2.5 checkpoints: epoch 1 writes best.pt and last.pt, epoch 2's next
    checkpoint does not fit and is refused before writing, naming the folder and the bytes."""
    size = (smoke_run / "checkpoints" / "last.pt").stat().st_size
    with small_filesystem(tmp_path / "fs", int(size * 2.5)) as fs:
        run = fs / "run"
        argv = ["train", "--config", SMOKE_CONFIG, "--run-dir", str(run), "--no-progress",
                "--set", "train.epochs=2", "--set", "train.iterations_per_epoch=2"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"segcalib: error: {run / 'checkpoints'}: not enough free space to write " in err
        assert "bytes free, about " in err and "Traceback" not in err
        last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
        assert last["epoch"] == 1
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_tensorboard_on_a_real_full_disk_is_a_resource_error(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "fs", 256 * 1024) as fs:
        fill(fs, 0)
        log = MetricsLog(tmp_path / "metrics.csv", fs / "tensorboard")
        with pytest.raises(ResourceError) as info:
            log.append({"epoch": 1, "train_loss": 0.5})
        assert str(info.value).startswith(f"{fs / 'tensorboard'}: no space left on the device for the TensorBoard events")
        assert "--resume" in str(info.value)
        log.close()


@pytest.mark.parametrize("code, error", [(errno.ENOSPC, ResourceError), (errno.EACCES, RunError)])
def test_tensorboard_write_errors_are_named(tmp_path: Path, monkeypatch, code: int, error: type) -> None:
    from torch.utils.tensorboard import SummaryWriter

    log = MetricsLog(tmp_path / "metrics.csv", tmp_path / "tb")
    log.append({"epoch": 1, "train_loss": 0.5})

    def failing_flush(self) -> None:
        raise OSError(code, "simulated")

    monkeypatch.setattr(SummaryWriter, "flush", failing_flush)
    with pytest.raises(error, match=f"^{tmp_path / 'tb'}: .*TensorBoard events"):
        log.append({"epoch": 2, "train_loss": 0.4})
    assert "2,0.4" in (tmp_path / "metrics.csv").read_text()  # the CSV row of the epoch is kept
    monkeypatch.undo()
    log.close()


def test_resume_from_a_checkpoint_missing_a_training_state_exits_2_naming_it(smoke_run: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    del state["optimizer"]
    torch.save(state, run / "checkpoints" / "last.pt")
    argv = ["train", "--run-dir", str(run), "--resume", "--no-progress", "--set", "train.epochs=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"segcalib: error: {run / 'checkpoints' / 'last.pt'}: not a usable segcalib checkpoint for resume: key 'optimizer' is missing" in err


def test_training_without_training_cases_exits_2_before_any_file(tmp_path: Path, capsys) -> None:
    smoke = json.loads(Path(SMOKE_CONFIG).parent.joinpath("../data_manifests/hippocampus_smoke.json").read_text())
    root = (Path(SMOKE_CONFIG).parent / "../data_manifests").resolve()
    entries = [{k: str((root / v).resolve()) for k, v in e.items()} for e in smoke["training"]]
    manifest = tmp_path / "external.json"
    manifest.write_text(json.dumps({**{k: v for k, v in smoke.items() if k not in ("training", "validation", "test")},
                                    "test": entries}))
    run = tmp_path / "run"
    argv = ["train", "--config", SMOKE_CONFIG, "--run-dir", str(run), "--set", f"data.manifest={manifest}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{manifest}: the 'training' list is missing (training needs labelled training cases)" in err
    assert not run.exists()


def test_a_full_disk_under_tensorboard_prints_one_message_and_no_traceback(tmp_path: Path) -> None:
    """The writer's own thread would print a traceback to stderr before the error is named."""
    import subprocess
    import sys

    script = (
        "import sys\nfrom pathlib import Path\nfrom segcalib.errors import ResourceError\n"
        "from segcalib.training.metrics_log import MetricsLog\n"
        "log = MetricsLog(Path(sys.argv[1]) / 'metrics.csv', Path(sys.argv[2]) / 'tensorboard')\n"
        "try:\n    log.append({'epoch': 1, 'train_loss': 0.5})\nexcept ResourceError as exc:\n"
        "    print(exc, file=sys.stderr)\n    sys.exit(2)\n"
    )
    repo = Path(__file__).resolve().parents[2]
    with small_filesystem(tmp_path / "fs", 256 * 1024) as fs:
        fill(fs, 0)
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(fs)], cwd=repo, capture_output=True,
                              text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().startswith(f"{fs / 'tensorboard'}: no space left") and "Traceback" not in done.stderr
