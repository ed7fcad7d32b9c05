"""One writer per output folder, with real processes: the second command exits 2 naming the
folder and the holder; a holder killed with -9 leaves no lock behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segcalib.cli import main
from segcalib.data import load_manifest
from segcalib.errors import RunError
from segcalib.utils.locks import LOCK_NAME, folder_entries, folder_lock, lock_holder
from tests.synthetic import make_dataset, write_nifti

REPO_ROOT = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
from segcalib.utils.locks import folder_lock
from segcalib.errors import RunError
try:
    with folder_lock(sys.argv[1], command="holder"):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
except RunError as exc:
    print(exc, file=sys.stderr)
    sys.exit(2)
"""


def _python(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("RANK", None)
    return subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _holder(folder: Path, seconds: float = 60.0) -> subprocess.Popen:
    proc = _python("-c", HOLD, str(folder), str(seconds))
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def predictions(tmp_path: Path) -> tuple[Path, Path]:
    """A manifest and a folder of perfect probability maps for its one test case."""
    manifest = make_dataset(tmp_path / "data", 2, (10, 10, 6), None, {"training": 1, "test": 1})
    case = load_manifest(manifest).cases("test")[0]
    label = np.asarray(nib.load(str(case.label)).dataobj).astype(np.int64)
    write_nifti(tmp_path / "pred" / f"{case.case_id}_probs.nii.gz", np.eye(3, dtype=np.float32)[label])
    return manifest, tmp_path / "pred"


def test_lock_records_the_holder_and_leaves_nothing_behind(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "out"
    with folder_lock(folder, command="export") as locked:
        assert locked == folder and folder.is_dir()
        holder = lock_holder(folder)
        assert holder["pid"] == os.getpid() and holder["command"] == "export"
        assert folder_entries(folder) == []  # the lock file does not count as content
        with pytest.raises(RunError, match=rf"{folder}: in use by another segcalib command \(pid {os.getpid()}"):
            with folder_lock(folder, command="evaluate"):
                pass  # a second open file description is refused even in the same process
    assert not (tmp_path / "new").exists()  # created for the lock only, removed again

    kept = tmp_path / "kept"
    with folder_lock(kept, command="report"):
        (kept / "report.json").write_text("{}")
    assert sorted(p.name for p in kept.iterdir()) == ["report.json"]


def test_a_folder_under_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="file exists and is not a folder"):
        with folder_lock(tmp_path / "file" / "out", command="export"):
            pass
    with pytest.raises(RunError, match="file exists and is not a folder"):
        with folder_lock(tmp_path / "file", command="export"):
            pass


def test_non_zero_torchrun_ranks_do_not_lock(tmp_path: Path, monkeypatch) -> None:
    with folder_lock(tmp_path / "out", command="evaluate"):
        monkeypatch.setenv("RANK", "1")
        with folder_lock(tmp_path / "out", command="evaluate"):
            assert lock_holder(tmp_path / "out")["pid"] == os.getpid()


def test_two_racing_processes_one_wins_one_exits_2_naming_the_other(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    procs = [_python("-c", HOLD, str(folder), "3") for _ in range(2)]
    results = [(p.wait(timeout=60), p.stdout.read(), p.stderr.read(), p.pid) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    winner = next(r for r in results if r[0] == 0)
    loser = next(r for r in results if r[0] == 2)
    assert str(folder) in loser[2] and f"pid {winner[3]}" in loser[2] and "`segcalib holder`" in loser[2]
    assert not folder.exists()


def test_cli_command_refused_while_locked_then_proceeds_after_kill_9(tmp_path: Path, predictions, capsys) -> None:
    manifest, pred = predictions
    out = tmp_path / "report"
    holder = _holder(out)
    try:
        command = ["-m", "segcalib", "evaluate", "--predictions", str(pred), "--manifest", str(manifest),
                   "--output", str(out), "--device", "cpu"]
        refused = _python(*command)
        _, err = refused.communicate(timeout=120)
        assert refused.returncode == 2, err
        assert f"{out}: in use by another segcalib command (pid {holder.pid}" in err
        assert "Traceback" not in err
        assert not (out / "report.json").exists()
        # in-process too: the same message through segcalib.cli.main
        assert main(["report", str(pred), "--output", str(out)]) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (out / LOCK_NAME).exists() and json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid  # stale file
    rerun = _python(*command)
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["dice_fg"] == 1.0
    assert not (out / LOCK_NAME).exists()


def test_export_and_train_take_the_lock(tmp_path: Path, capsys) -> None:
    """Each writing command refuses a folder held by another process, before any work."""
    out = tmp_path / "held"
    holder = _holder(out)
    try:
        started = time.monotonic()
        assert main(["export", "--run", str(tmp_path / "no_run"), "--manifest", "m.json", "--output", str(out)]) == 2
        assert main(["train", "--config", str(REPO_ROOT / "configs" / "smoke.yaml"), "--run-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count(f"{out}: in use by another segcalib command (pid {holder.pid}") == 2
        assert time.monotonic() - started < 30
    finally:
        holder.kill()
        holder.wait(timeout=30)
