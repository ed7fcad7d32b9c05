"""What one run of the grid goes through, each step resumable (a finished step is reused).

Phase 1, per run (independent: run in parallel with ``--jobs``): train (or reuse), export the
protocol's splits and the test split with logits at T = 1, evaluate validation and test at T = 1,
cross-validate every calibrator on every fit region over the protocol's cases, and save each
candidate refitted on all of them. Phase 2, once the choice is made: apply a saved calibrator to
the run's test maps and evaluate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from segcalib.calibrators import build_calibrator, save_calibrator
from segcalib.calibrators.selection import cross_validate
from segcalib.config import load_config
from segcalib.data import load_manifest
from segcalib.experiment import train_or_reuse
from segcalib.export import EXPORT_JSON, ExportOptions, export
from segcalib.export.posthoc import apply_to_predictions
from segcalib.reports import evaluate, read_report
from segcalib.utils.devices import select_device
from segcalib.utils.files import write_text_atomic

from pipelines.study.cases import PROTOCOL_FOLDS, case_stream, export_folder, protocol_case_ids, protocol_splits
from pipelines.study.grid import GridSettings, Job, job_overrides

log = logging.getLogger("segcalib.study")
NONE = "none"  # the "no calibrator" candidate


@dataclass(frozen=True)
class CVSettings:
    """How calibrators are cross-validated (part of the cache key of every CV file)."""

    protocol: str
    calibrators: tuple[str, ...]
    regions: tuple[str, ...]
    folds: int | None = None  # None: the protocol's k
    seed: int = 0
    max_voxels: int = 2_000_000

    @property
    def k(self) -> int:
        return self.folds or PROTOCOL_FOLDS[self.protocol]

    def record(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "calibrators": list(self.calibrators), "folds": self.k,
                "seed": self.seed, "max_voxels": self.max_voxels}

    @property
    def tag(self) -> str:
        """Folder name of these settings' files: other settings never overwrite (or clash with) them."""
        digest = hashlib.sha1(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.protocol}_{digest}"


def run_dir(job: Job, settings: GridSettings) -> Path:
    return settings.out / job.folder


def manifest_of(job: Job, settings: GridSettings) -> tuple[Path, int]:
    """The run's manifest and split seed (from its saved config)."""
    cfg = load_config(run_dir(job, settings) / "config.yaml")
    return Path(cfg.data.manifest), cfg.data.split_seed


def evaluate_once(predictions: Path, manifest: Path, report_dir: Path, split: str, device: str | None) -> dict[str, Any]:
    """Summary of ``predictions`` (a report newer than the maps is reused)."""
    report = report_dir / "report.json"
    if not (report.exists() and report.stat().st_mtime >= (predictions / EXPORT_JSON).stat().st_mtime):
        evaluate(predictions, manifest, report_dir, split=split, device=device, write_html=False)
    return read_report(report)["summary"]


def cv_file(job: Job, settings: GridSettings, cv: CVSettings, region: str) -> Path:
    return run_dir(job, settings) / "study" / cv.tag / f"cv_{region}.json"


def calibrator_dir(job: Job, settings: GridSettings, cv: CVSettings, region: str, name: str) -> Path:
    return run_dir(job, settings) / "study" / cv.tag / "calibrators" / region / name


def prepare_run(job: Job, settings: GridSettings, cv: CVSettings, threads: int | None = None) -> dict[str, Any]:
    """Phase 1 of ``job``; returns ``{"validation": summary, "test": summary, "cv": {region: record}}``."""
    if threads:
        torch.set_num_threads(threads)
    folder = run_dir(job, settings)
    overrides = job_overrides(job, settings, load_config(job.config).train.epochs)
    train_or_reuse(job.config, folder, overrides, progress=False)
    manifest, split_seed = manifest_of(job, settings)
    for split in sorted({*protocol_splits(cv.protocol), "validation", "test"}):
        options = ExportOptions(split=split, logits=True, device=settings.device, progress=False)
        export(folder, manifest, export_folder(folder, split), options)
    out: dict[str, Any] = {
        split: evaluate_once(export_folder(folder, split), manifest, folder / "reports" / f"{split}_T1", split, settings.device)
        for split in ("validation", "test")
    }
    out["cv"] = {region: cross_validate_run(job, settings, cv, region, manifest, split_seed) for region in cv.regions}
    return out


def cross_validate_run(job: Job, settings: GridSettings, cv: CVSettings, region: str, manifest: Path,
                       split_seed: int) -> dict[str, Any]:
    """Out-of-fold scores of every calibrator fitted on ``region`` (cached), each refitted on all cases and saved."""
    path = cv_file(job, settings, cv, region)
    if path.exists():
        record = json.loads(path.read_text())
        if record.get("settings") == cv.record():
            return record
    loaded = load_manifest(manifest, split_seed=split_seed)
    num_classes, case_ids = loaded.num_classes, protocol_case_ids(loaded, cv.protocol)
    device = select_device(settings.device)
    stream = case_stream(run_dir(job, settings), manifest, cv.protocol, device, split_seed)

    def builder(name: str):
        return lambda mv: build_calibrator(name, num_classes, seed=cv.seed, max_voxels=mv)

    result = cross_validate(stream, case_ids, {n: builder(n) for n in cv.calibrators}, num_classes, folds=cv.k,
                            seed=cv.seed, fit_region=region, max_voxels=cv.max_voxels)
    for name, row in result.table.items():
        if "error" not in row:
            extra = {"fit_region": region, "cases": case_ids, "protocol": cv.protocol}
            save_calibrator(result.refit(name), calibrator_dir(job, settings, cv, region, name), extra=extra)
    record = {"settings": cv.record(), "region": region, "folds": result.folds, "table": result.table,
              "uncalibrated": result.uncalibrated}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=1, default=_json_float))
    return json.loads(path.read_text())


def _json_float(value: Any) -> Any:
    return float(value)


def calibrated_test(job: Job, settings: GridSettings, cv: CVSettings, name: str, region: str,
                    threads: int | None = None) -> dict[str, Any]:
    """Phase 2: test summary of ``job`` with calibrator ``name`` fitted on ``region`` (``none``: T = 1)."""
    if threads:
        torch.set_num_threads(threads)
    folder = run_dir(job, settings)
    manifest, _ = manifest_of(job, settings)
    if name == NONE:
        return evaluate_once(export_folder(folder, "test"), manifest, folder / "reports" / "test_T1", "test", settings.device)
    tag = f"{cv.tag}_{region}_{name}"
    output = folder / "exports" / f"test_{tag}"
    report_dir = folder / "reports" / f"test_{tag}"
    if not _complete_with_report(output, report_dir):
        apply_to_predictions(calibrator_dir(job, settings, cv, region, name), export_folder(folder, "test"), output,
                             device=settings.device, progress=False)
    return evaluate_once(output, manifest, report_dir, "test", settings.device)


def _complete_with_report(output: Path, report_dir: Path) -> bool:
    """A complete calibrated folder already evaluated (applying again would rewrite its record)."""
    record, report = output / EXPORT_JSON, report_dir / "report.json"
    if not (record.exists() and report.exists()):
        return False
    return json.loads(record.read_text()).get("status") == "complete" and report.stat().st_mtime >= record.stat().st_mtime


def calibrated_test_folder(job: Job, settings: GridSettings, cv: CVSettings, name: str, region: str) -> Path:
    """The folder :func:`calibrated_test` wrote."""
    folder = run_dir(job, settings)
    return export_folder(folder, "test") if name == NONE else folder / "exports" / f"test_{cv.tag}_{region}_{name}"


def worker_threads(jobs: int) -> int:
    """Torch threads per worker process so that ``jobs`` workers share the CPU cores."""
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def run_all(fn: Callable[..., Any], tasks: Sequence[tuple], jobs: int) -> list[Any]:
    """``fn(*task)`` for every task, in ``jobs`` spawned processes (in this one for ``jobs`` = 1)."""
    if jobs <= 1 or len(tasks) <= 1:
        return [fn(*task) for task in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(fn, *task, worker_threads(jobs)) for task in tasks]
        return [f.result() for f in futures]
