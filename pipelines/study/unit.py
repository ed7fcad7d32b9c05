"""One unit of the study, taken all the way, and its compact record.

A unit is one (regime, loss, seed) run: train (or reuse) → export the protocol's splits and the test
split with logits at T = 1 → cross-validate every calibrator on every fit region → refit each on all
the protocol's cases → score every candidate (none, and each calibrator × fit region) on the test
cases in one pass (:mod:`pipelines.study.scoring`) → write one record,
``<records>/<regime>/<loss>/seed<k>.json``, atomically. The heavy outputs (run folder, maps,
calibrators) stay under ``--out`` and may be deleted; tables and the selection are rebuilt from the
records alone. A unit with a record is never redone; a killed unit leaves no record and is redone
(its finished steps -- training, exports, cross-validation files -- are reused when still there).
"""

from __future__ import annotations

import csv
import json
import logging
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from segcalib.calibrators import load_calibrator
from segcalib.config import load_config
from segcalib.experiment import train_or_reuse
from segcalib.export import ExportOptions, export
from segcalib.utils.devices import select_device
from segcalib.utils.files import write_text_atomic

from pipelines.study.cases import export_folder, protocol_splits
from pipelines.study.grid import NONE, REPO, GridSettings, Job, job_overrides
from pipelines.study.run import CVSettings, calibrator_dir, cross_validate_run, manifest_of, run_dir
from pipelines.study.scoring import finite_or_none, score_split

log = logging.getLogger("segcalib.study")
RECORDS = REPO / "docs" / "results" / "study"
RECORD_FORMAT = "segcalib-study-unit/1"


def candidate_key(calibrator: str, region: str) -> str:
    """Key of a candidate in a record's ``test`` section (``none`` for the raw maps)."""
    return NONE if calibrator == NONE else f"{calibrator}@{region}"


def record_path(job: Job, records: Path = RECORDS) -> Path:
    return Path(records) / job.regime / job.loss / f"seed{job.seed}.json"


def read_record(job: Job, records: Path = RECORDS) -> dict[str, Any] | None:
    """The unit's record, or None when it has not finished (no file, or another format)."""
    path = record_path(job, records)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record.get("format") == RECORD_FORMAT else None


def load_records(records: Path = RECORDS) -> dict[Job, dict[str, Any]]:
    """Every finished unit's record under ``records``."""
    out = {}
    for path in sorted(Path(records).glob("*/*/seed*.json")):
        record = json.loads(path.read_text())
        if record.get("format") == RECORD_FORMAT:
            unit = record["unit"]
            out[Job(unit["regime"], unit["loss"], int(unit["seed"]))] = record
    return out


def run_unit(job: Job, grid: GridSettings, cv: CVSettings, records: Path, hardware: str,
             threads: int | None = None) -> dict[str, Any]:
    """Take ``job`` all the way and write its record (returned); an existing record is returned as is."""
    done = read_record(job, records)
    if done is not None:
        return done
    if threads:
        torch.set_num_threads(threads)
    clock = {"started": time.time()}
    folder = run_dir(job, grid)
    overrides = job_overrides(job, grid, load_config(job.config).train.epochs)
    log.info("unit %s: training", job.folder)
    train_or_reuse(job.config, folder, overrides, progress=False)
    clock["trained"] = time.time()
    manifest, split_seed = manifest_of(job, grid)
    for split in sorted({*protocol_splits(cv.protocol), "validation", "test"}):
        export(folder, manifest, export_folder(folder, split),
               ExportOptions(split=split, logits=True, device=grid.device, progress=False))
    clock["exported"] = time.time()
    log.info("unit %s: cross-validating %d calibrators on %s", job.folder, len(cv.calibrators), ", ".join(cv.regions))
    cv_records = {region: cross_validate_run(job, grid, cv, region, manifest, split_seed) for region in cv.regions}
    clock["cross_validated"] = time.time()
    candidates: dict[str, Any] = {NONE: None}
    for region, cv_record in cv_records.items():
        for name, row in cv_record["table"].items():
            if "error" not in row:
                candidates[candidate_key(name, region)] = load_calibrator(calibrator_dir(job, grid, cv, region, name))
    device = select_device(grid.device)
    test = score_split(folder, manifest, "test", split_seed, candidates, device)
    validation = score_split(folder, manifest, "validation", split_seed, {NONE: None}, device)
    clock["scored"] = time.time()
    record = {
        "format": RECORD_FORMAT,
        "unit": {"regime": job.regime, "loss": job.loss, "seed": job.seed},
        "ran": _where(grid, hardware, device),
        "settings": {"cv": cv.record(), "regions": list(cv.regions), "overrides": overrides,
                     "recipe": _recipe(folder)},
        "training": _training(folder),
        "seconds": {
            "train": round(clock["trained"] - clock["started"], 1),
            "export": round(clock["exported"] - clock["trained"], 1),
            "cross_validation": round(clock["cross_validated"] - clock["exported"], 1),
            "scoring": round(clock["scored"] - clock["cross_validated"], 1),
            "total": round(clock["scored"] - clock["started"], 1),
        },
        "validation": {NONE: validation[NONE]["summary"]},
        "cv": {region: {k: r[k] for k in ("folds", "table", "uncalibrated")} for region, r in cv_records.items()},
        "test": test,
    }
    path = record_path(job, records)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(finite_or_none(record), separators=(",", ":"), sort_keys=True) + "\n")
    log.info("unit %s: done in %.1f min, record %s", job.folder, record["seconds"]["total"] / 60, path)
    return json.loads(path.read_text())


def _where(grid: GridSettings, hardware: str, device: torch.device) -> dict[str, Any]:
    return {"hardware": hardware, "device": str(device), "torch_threads": torch.get_num_threads(),
            "host": platform.node(), "commit": _commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "torch": str(torch.__version__)}


def _commit() -> str:
    """``HEAD`` (with ``+dirty`` when code the unit runs differs from it), or ``unknown`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "segcalib", "pipelines", "configs"], cwd=REPO,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _recipe(folder: Path) -> dict[str, Any]:
    cfg = load_config(folder / "config.yaml")
    return {"model": cfg.model.name, "channels": cfg.model.params.get("channels"),
            "num_res_units": cfg.model.params.get("num_res_units"), "patch_size": list(cfg.data.patch_size),
            "batch_size": cfg.train.batch_size, "lr": cfg.train.lr, "optimizer": cfg.train.optimizer,
            "scheduler": cfg.train.scheduler, "epochs": cfg.train.epochs, "manifest": _shown(Path(cfg.data.manifest))}


def unit_seconds(record: dict[str, Any]) -> float:
    """A unit's seconds from its record: every epoch's training time (``metrics.csv``, so a resumed
    run counts its earlier epochs too) plus the export, cross-validation and scoring of its last run
    (``seconds`` itself times only the last invocation)."""
    seconds = record["seconds"]
    trained = record.get("training", {}).get("seconds", seconds["train"])
    return float(trained) + float(seconds["total"]) - float(seconds["train"])


def _training(folder: Path) -> dict[str, Any]:
    """Epochs and training seconds from the run's ``metrics.csv``."""
    path = folder / "metrics.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {"epochs": len(rows), "seconds": round(sum(float(r["seconds"]) for r in rows if r.get("seconds")), 1)}


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)
