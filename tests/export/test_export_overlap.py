"""Export with writing overlapped with the next case's prediction: the same files byte for byte as
one case after the other, written on the worker thread; write errors and refused maps surface
from it with the sequential path's messages and clean-up."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

import segcalib.export.exporter as exporter
import segcalib.export.writers as writers
from segcalib.config import load_config
from segcalib.errors import DataError, RunError
from segcalib.export import ExportOptions, export
from tests.conftest import SMOKE_CONFIG
from tests.synthetic import LPS_ANISO, make_dataset
from tests.export.echo_model import echo_model

N_TEST = 3


@pytest.fixture
def echo_export(tmp_path: Path, monkeypatch) -> Path:
    """A manifest with three test cases, exported by the intensity-echo model (no training)."""
    splits = {"test": N_TEST, "training": 1, "validation": 1}
    manifest = make_dataset(tmp_path / "data", N_TEST + 2, (12, 10, 8), LPS_ANISO, splits)
    cfg = load_config(SMOKE_CONFIG, {"data.manifest": str(manifest), "data.patch_size": [8, 8, 8]})
    monkeypatch.setattr(exporter, "load_trained_model", lambda *args, **kwargs: echo_model(cfg))
    return manifest


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "export.json"}


def _record_writers(monkeypatch) -> list[tuple[str, str]]:
    """(thread name, file name) of every map written from now on."""
    seen: list[tuple[str, str]] = []
    real = writers.save_like

    def save_like(array, reference, path, dtype, **kwargs):
        seen.append((threading.current_thread().name, Path(path).name))
        return real(array, reference, path, dtype, **kwargs)

    monkeypatch.setattr(writers, "save_like", save_like)
    return seen


def test_overlapped_files_equal_sequential_byte_for_byte(echo_export: Path, tmp_path: Path, monkeypatch) -> None:
    seen = _record_writers(monkeypatch)
    options = dict(uncertainty=True, dtype="float16", progress=False)
    plain = export("run", echo_export, tmp_path / "plain", ExportOptions(overlap=False, **options))
    assert seen and all(thread == threading.main_thread().name for thread, _ in seen)
    seen.clear()
    fast = export("run", echo_export, tmp_path / "fast", ExportOptions(overlap=True, **options))
    assert seen and all(thread.startswith("segcalib-finish") for thread, _ in seen)

    assert fast.cases == plain.cases and len(fast.cases) == N_TEST
    files = _files(tmp_path / "plain")
    assert len(files) == 3 * N_TEST  # probs, seg, uncertainty per case
    assert _files(tmp_path / "fast") == files
    record = json.loads((tmp_path / "fast" / "export.json").read_text())
    assert record["status"] == "complete" and record["cases"] == plain.cases
    seen.clear()  # by default only a model on a GPU overlaps: on the CPU both would share the cores
    export("run", echo_export, tmp_path / "default", ExportOptions(**options))
    assert seen and all(thread == threading.main_thread().name for thread, _ in seen)


@pytest.mark.parametrize("overlap", [True, False])
def test_write_error_names_the_case_and_keeps_complete_maps(echo_export: Path, tmp_path: Path, monkeypatch, overlap) -> None:
    out = tmp_path / "out"
    real = writers.save_like
    written: list[str] = []

    def failing(array, reference, path, dtype, **kwargs):
        if len(written) == 2:  # the probs map of the second case (after probs and seg of the first)
            raise PermissionError(13, "Permission denied", str(path))
        real(array, reference, path, dtype, **kwargs)
        written.append(Path(path).name)

    monkeypatch.setattr(writers, "save_like", failing)
    with pytest.raises(RunError, match=r"writing the maps of case \S+ failed \(PermissionError: .*Permission denied") as err:
        export("run", echo_export, out, ExportOptions(progress=False, overlap=overlap))
    assert str(out) in str(err.value)
    first = sorted(_files(out))  # the first case, complete; nothing of the second; no temporary file
    assert len(first) == 2 and first[0].split("_probs")[0] == first[1].split("_seg")[0]
    assert not list(out.glob(".*tmp*"))
    assert json.loads((out / "export.json").read_text())["status"] == "running"

    monkeypatch.setattr(writers, "save_like", real)
    again = export("run", echo_export, out, ExportOptions(progress=False))
    assert len(again.skipped) == 1 and len(again.cases) == N_TEST - 1
    assert len(_files(out)) == 2 * N_TEST


@pytest.mark.parametrize("overlap", [True, False])
def test_refused_maps_from_the_writer_roll_the_folder_back(echo_export: Path, tmp_path: Path, monkeypatch, overlap) -> None:
    out = tmp_path / "out"
    real = writers.check_maps
    calls = {"n": 0}

    def refuse_second(maps, what, producer=None):
        calls["n"] += 1
        if calls["n"] == 2:
            real(np.full_like(maps, np.nan), what, producer)
        real(maps, what, producer)

    monkeypatch.setattr(writers, "check_maps", refuse_second)
    with pytest.raises(DataError, match="NaN or infinite value.*nothing was written for this case"):
        export("run", echo_export, out, ExportOptions(progress=False, overlap=overlap))
    assert not out.exists()  # made by this export, removed with what it wrote (as without overlap)
