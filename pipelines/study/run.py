"""The resumable steps of a unit below its record (:mod:`pipelines.study.unit`): where a run lives, and the
cross-validation of every calibrator on one fit region, cached per settings, with each candidate
refitted on all the protocol's cases and saved."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from segcalib.calibrators import build_calibrator, save_calibrator
from segcalib.calibrators.selection import CV_FIT_VOXELS, cross_validate
from segcalib.config import load_config
from segcalib.data import load_manifest
from segcalib.utils.devices import select_device
from segcalib.utils.files import write_text_atomic

from pipelines.study.cases import PROTOCOL_FOLDS, case_stream, protocol_case_ids, protocol_splits
from pipelines.study.grid import GridSettings, Job

log = logging.getLogger("segcalib.study")


@dataclass(frozen=True)
class CVSettings:
    """How calibrators are cross-validated (part of the cache key of every CV file)."""

    protocol: str
    calibrators: tuple[str, ...]
    regions: tuple[str, ...]
    folds: int | None = None  # None: the protocol's k
    seed: int = 0
    max_voxels: int = 2_000_000
    fit_voxels: int = CV_FIT_VOXELS

    @property
    def k(self) -> int:
        return self.folds or PROTOCOL_FOLDS[self.protocol]

    def record(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "calibrators": list(self.calibrators), "folds": self.k,
                "seed": self.seed, "max_voxels": self.max_voxels, "fit_voxels": self.fit_voxels}

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


def cv_file(job: Job, settings: GridSettings, cv: CVSettings, region: str) -> Path:
    return run_dir(job, settings) / "study" / cv.tag / f"cv_{region}.json"


def calibrator_dir(job: Job, settings: GridSettings, cv: CVSettings, region: str, name: str) -> Path:
    return run_dir(job, settings) / "study" / cv.tag / "calibrators" / region / name


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
                            seed=cv.seed, fit_region=region, max_voxels=cv.max_voxels,
                            fit_voxels=cv.fit_voxels, groups={c.case_id: c.group for c in _protocol_cases(loaded, cv.protocol)})
    for name, row in result.table.items():
        if "error" not in row:
            extra = {"fit_region": region, "cases": case_ids, "protocol": cv.protocol}
            save_calibrator(result.refit(name), calibrator_dir(job, settings, cv, region, name), extra=extra)
    record = {"settings": cv.record(), "region": region, "folds": result.folds, "table": result.table,
              "uncalibrated": result.uncalibrated}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=1, default=_json_float))
    return json.loads(path.read_text())


def _protocol_cases(manifest, protocol: str):
    return [c for split in protocol_splits(protocol) for c in manifest.labelled(split)]


def _json_float(value: Any) -> Any:
    return float(value)


def worker_threads(jobs: int) -> int:
    """Torch threads per worker process so that ``jobs`` workers share the CPU cores."""
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def _worker_init(level: int, parent: int) -> None:
    """A spawned worker logs as the parent does (its progress lines reach the same stream), each
    line naming the worker process, and ends when the parent does, however it ended (a killed
    study must not leave a unit training on, which a restarted study would train a second time)."""
    import threading

    logging.basicConfig(level=level, format="%(asctime)s [%(processName)s] %(message)s")

    def end_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)  # units are resumable and every file they write appears whole or not at all

    threading.Thread(target=end_with_parent, name="end-with-parent", daemon=True).start()


class UnitPool:
    """Runs ``fn(*task)`` in up to ``jobs`` spawned processes (each with ``worker_threads(jobs)`` torch
    threads), or here, one at a time, for ``jobs`` = 1. ``start`` hands a task over; ``wait_any``
    blocks until at least one has ended and returns the ended tasks' ids (re-raising a failure)."""

    def __init__(self, fn: Callable[..., Any], jobs: int) -> None:
        self.fn, self.jobs = fn, max(1, jobs)
        self._pool = None
        if self.jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            context = multiprocessing.get_context("spawn")
            level = logging.getLogger().getEffectiveLevel()
            self._pool = ProcessPoolExecutor(
                self.jobs, mp_context=context, initializer=_worker_init, initargs=(level, os.getpid())
            )
        self._running: dict[Any, Any] = {}  # future -> task id
        self._done_here: list[Any] = []

    def __enter__(self) -> "UnitPool":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    @property
    def free(self) -> int:
        """How many tasks can start now (a task run here counts until ``wait_any`` reports it)."""
        return self.jobs - len(self._running) - len(self._done_here)

    def start(self, task_id: Any, task: tuple) -> None:
        if self._pool is None:
            self.fn(*task)
            self._done_here.append(task_id)
            return
        self._running[self._pool.submit(self.fn, *task, worker_threads(self.jobs))] = task_id

    def wait_any(self) -> list[Any]:
        if self._pool is None:
            done, self._done_here = self._done_here, []
            return done
        from concurrent.futures import FIRST_COMPLETED, wait

        finished, _ = wait(list(self._running), return_when=FIRST_COMPLETED)
        for future in finished:
            future.result()
        return [self._running.pop(future) for future in finished]

    @property
    def running(self) -> list[Any]:
        return list(self._running.values())
