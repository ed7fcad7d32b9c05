"""One experiment end to end: train -> export (raw and temperature-scaled) -> evaluate -> compare.

Every step is resumable: a finished run is reused (an unfinished one resumed), complete exports
are skipped and a report newer than its export is kept. ``segcalib demo`` and the study in
``pipelines/`` are built on :func:`run_experiment`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from segcalib.config import load_config
from segcalib.errors import RunError
from segcalib.export import ExportOptions, export
from segcalib.export.posthoc import FitOptions, apply_to_predictions, fit_on_predictions
from segcalib.inference.temperature import TemperatureRequest
from segcalib.reports import compare, evaluate, read_report
from segcalib.spatial.regions import ALL, default_regions
from segcalib.training import train
from segcalib.runs import RunDir, check_run_config, load_checkpoint

log = logging.getLogger("segcalib")


@dataclass
class ExperimentResult:
    run_dir: Path
    reports: dict[str, Path] = field(default_factory=dict)  # variant -> report.json
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    comparison_html: Path | None = None
    trained_epochs: int = 0

    @property
    def report_html(self) -> Path:
        return self.comparison_html or next(iter(self.reports.values())).with_name("report.html")

    def describe(self) -> str:
        lines = [f"run: {self.run_dir}"]
        for variant, s in self.summaries.items():
            lines.append(
                f"  {variant:<18} Dice fg {s['dice_fg']:.4f}  HD95 {s['hd95']:.2f} mm  "
                + "  ".join(f"ECE {r} {s[f'ece_{r}']:.4f}" for r in default_regions())
                + f"  NLL {s['nll']:.4f}  T {_t(s['temperature'])}"
            )
        return "\n".join(lines)


def _t(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def train_or_reuse(config: str | Path, run_dir: Path, overrides: Sequence[str] = (), progress: bool = True) -> int:
    """Train ``config`` into ``run_dir`` unless it already finished; resume an unfinished run.

    A run folder that holds another config (anything but ``train.epochs`` changed), or more
    epochs than asked for, is refused rather than silently reused.
    """
    cfg = load_config(config, overrides)
    run = RunDir(run_dir)
    if not run.last.exists():
        train(cfg, run, resume=not run.is_empty(), progress=progress)
        return cfg.train.epochs
    check_run_config(run, cfg.to_dict(), "reuse")
    done = int(load_checkpoint(run.last)["epoch"])
    if done > cfg.train.epochs:
        raise RunError(f"{run_dir}: holds a run trained for {done} epochs, more than the {cfg.train.epochs} asked for")
    if done == cfg.train.epochs:
        log.info("%s: reusing the finished run (%d epochs)", run_dir, done)
    else:
        train(cfg, run, resume=True, progress=progress)
    return cfg.train.epochs


def run_experiment(
    config: str | Path,
    run_dir: Path,
    overrides: Sequence[str] = (),
    manifest: str | Path | None = None,
    split: str = "test",
    temperature_region: str = ALL,
    temperature_regions: Sequence[str] | None = None,
    calibrator: str | None = None,
    progress: bool = True,
) -> ExperimentResult:
    """Train (or reuse), export ``split`` with T = 1 and with fitted temperatures, evaluate, compare.

    ``calibrator`` (a registered method or ``auto``) adds a post-hoc calibrator fitted on the
    validation maps (``segcalib calibrate fit``) and applied to the ``split`` maps."""
    run_dir = Path(run_dir)
    result = ExperimentResult(run_dir=run_dir)
    result.trained_epochs = train_or_reuse(config, run_dir, overrides, progress)
    cfg = load_config(run_dir / "config.yaml")
    manifest = Path(manifest) if manifest is not None else cfg.data.manifest
    variants = [("T1", TemperatureRequest())]
    for region in temperature_regions or (temperature_region,):
        variants.append((f"Tfit_{region}", TemperatureRequest("fit", region=region)))
    folders = {}
    for name, request in variants:
        folders[name] = run_dir / "exports" / f"{split}_{name}"
        logits = calibrator is not None and request.mode == "none"  # the calibrator's input
        export(run_dir, manifest, folders[name], ExportOptions(split=split, temperature=request, logits=logits, progress=progress))
    if calibrator is not None:
        name = f"cal_{calibrator}"
        folders[name] = _calibrated(run_dir, manifest, split, calibrator, folders["T1"], progress)
    for name, predictions in folders.items():
        report_json = run_dir / "reports" / f"{split}_{name}" / "report.json"
        if not _newer(report_json, predictions / "export.json"):
            evaluate(predictions, manifest, report_json.parent, split=split)
        result.reports[name] = report_json
        result.summaries[name] = read_report(report_json)["summary"]
    comparison_dir = run_dir / "reports"
    compare([str(p) for p in result.reports.values()], comparison_dir)
    result.comparison_html = comparison_dir / "comparison.html"
    return result


def _newer(path: Path, than: Path) -> bool:
    return path.exists() and path.stat().st_mtime >= than.stat().st_mtime


def _calibrated(run_dir: Path, manifest: Path, split: str, method: str, source: Path, progress: bool) -> Path:
    """``segcalib calibrate fit`` on the validation maps, then ``apply`` to ``source`` (rerun: reused)."""
    fit_maps = run_dir / "exports" / "validation_T1"
    export(run_dir, manifest, fit_maps, ExportOptions(split="validation", logits=True, progress=progress))
    cal_dir = run_dir / "calibrators" / method
    if not _newer(cal_dir / "calibrator.json", fit_maps / "export.json"):
        fit_on_predictions(fit_maps, manifest, cal_dir, FitOptions(method=method, split="validation", folds=3))
    output = run_dir / "exports" / f"{split}_cal_{method}"
    apply_to_predictions(cal_dir, source, output, progress=progress)
    return output
