"""Hidden temporary files of a killed run are removed by the rerun that completes the folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from segcalib.cli import main
from segcalib.data import load_manifest
from segcalib.utils.files import atomic_path, is_temporary, remove_stale_temporaries
from tests.synthetic import make_dataset, write_nifti

REPO_ROOT = Path(__file__).resolve().parents[2]
KILLED_WRITER = """
import os, sys
from segcalib.utils.files import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half")
    print(tmp, flush=True)
    os.kill(os.getpid(), 9)
"""


@settings(max_examples=100, deadline=None)
@given(st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True), st.sampled_from(["", ".json", ".nii.gz", ".pt", ".csv"]))
def test_every_temporary_name_is_recognised(stem: str, suffix: str) -> None:
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="segcalib-tmpnames-"))
    with atomic_path(folder / f"{stem}{suffix}") as tmp:
        assert is_temporary(tmp)
    assert not is_temporary(folder / f"{stem}{suffix}") and not is_temporary(folder / f".{stem}{suffix}")


def test_rerun_removes_what_a_killed_run_left(tmp_path: Path) -> None:
    manifest = make_dataset(tmp_path / "data", 2, (10, 10, 6), None, {"training": 1, "test": 1})
    case = load_manifest(manifest).cases("test")[0]
    label = np.asarray(nib.load(str(case.label)).dataobj).astype(np.int64)
    write_nifti(tmp_path / "pred" / f"{case.case_id}_probs.nii.gz", np.eye(3, dtype=np.float32)[label])
    out = tmp_path / "report"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out / "report.json")], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    left = Path(killed.stdout.strip())
    assert left.exists() and left.parent == out and left.name.startswith(".report.")
    (out / ".keep").write_text("not ours")
    (out / "notes.tmp").write_text("not ours either")

    assert main(["evaluate", "--predictions", str(tmp_path / "pred"), "--manifest", str(manifest),
                 "--output", str(out), "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".keep", "notes.tmp", "report.html", "report.json"]


def test_recursive_removal_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / ".config.abcd_123.tmp.yaml", tmp_path / "checkpoints" / ".last.k2j4h5g6.tmp.pt"]
    for path in stale:
        path.write_text("x")
    (tmp_path / ".segcalib.lock").write_text("{}")
    assert remove_stale_temporaries(tmp_path) == [stale[0]]
    assert remove_stale_temporaries(tmp_path, recursive=True) == [stale[1]]
    assert sorted(p.name for p in tmp_path.rglob("*")) == [".segcalib.lock", "checkpoints"]
    assert remove_stale_temporaries(tmp_path / "missing") == []
