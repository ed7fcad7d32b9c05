"""One experiment end to end: train -> export (raw and temperature-scaled) -> evaluate -> compare.

Every step is resumable: a finished run is reused (an unfinished one resumed), complete exports
are skipped and a report newer than its export is kept. ``segcalib demo`` and the study in
``pipelines/`` are built on :func:`run_experiment`; :func:`compare_losses` runs it once per loss
(the demo: CE+Dice beside the study's recommended :class:`Recipe`) and writes one comparison.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from segcalib.config import load_config, read_yaml
from segcalib.config.schema import with_keys_added_since
from segcalib.errors import ConfigError, RunError
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
        width = max(map(len, self.summaries), default=0)
        for variant, s in self.summaries.items():
            lines.append(
                f"  {variant:<{width}}  Dice fg {s['dice_fg']:.4f}  HD95 {s['hd95']:.2f} mm  "
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
    check_run_config(run, cfg.to_dict(), "reuse", with_keys_added_since)
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
    calibrator_region: str = ALL,
    compare_reports: bool = True,
) -> ExperimentResult:
    """Train (or reuse), export ``split`` with T = 1 and with fitted temperatures, evaluate, compare.

    ``calibrator`` (a registered method or ``auto``) adds a post-hoc calibrator fitted on the
    validation voxels of ``calibrator_region`` (``segcalib calibrate fit``) and applied to the
    ``split`` maps."""
    run_dir = Path(run_dir)
    result = ExperimentResult(run_dir=run_dir)
    result.trained_epochs = train_or_reuse(config, run_dir, overrides, progress)
    cfg = load_config(run_dir / "config.yaml")
    manifest = Path(manifest) if manifest is not None else cfg.data.manifest
    variants = [("T1", TemperatureRequest())]
    for region in (temperature_region,) if temperature_regions is None else temperature_regions:
        variants.append((f"Tfit_{region}", TemperatureRequest("fit", region=region)))
    folders = {}
    for name, request in variants:
        folders[name] = run_dir / "exports" / f"{split}_{name}"
        logits = calibrator is not None and request.mode == "none"  # the calibrator's input
        export(run_dir, manifest, folders[name], ExportOptions(split=split, temperature=request, logits=logits, progress=progress))
    if calibrator is not None:
        fit = FitOptions(method=calibrator, region=calibrator_region, split="validation", folds=3)
        folders[f"cal_{_fitted_name(fit)}"] = _calibrated(run_dir, manifest, split, fit, folders["T1"], progress)
    for name, predictions in folders.items():
        report_json = run_dir / "reports" / f"{split}_{name}" / "report.json"
        if not _newer(report_json, predictions / "export.json"):
            evaluate(predictions, manifest, report_json.parent, split=split)
        result.reports[name] = report_json
        result.summaries[name] = read_report(report_json)["summary"]
    if compare_reports:
        comparison_dir = run_dir / "reports"
        compare([str(p) for p in result.reports.values()], comparison_dir)
        result.comparison_html = comparison_dir / "comparison.html"
    return result


def _newer(path: Path, than: Path) -> bool:
    return path.exists() and path.stat().st_mtime >= than.stat().st_mtime


def _fitted_name(fit: FitOptions) -> str:
    """``<method>`` for a fit on all voxels, ``<method>_<region>`` otherwise (folder and variant names)."""
    return fit.method if fit.region == ALL else f"{fit.method}_{fit.region}"


def _calibrated(run_dir: Path, manifest: Path, split: str, fit: FitOptions, source: Path, progress: bool) -> Path:
    """``segcalib calibrate fit`` on the validation maps, then ``apply`` to ``source`` (rerun: reused)."""
    fit_maps = run_dir / "exports" / "validation_T1"
    export(run_dir, manifest, fit_maps, ExportOptions(split="validation", logits=True, progress=progress))
    cal_dir = run_dir / "calibrators" / _fitted_name(fit)
    if not _newer(cal_dir / "calibrator.json", fit_maps / "export.json"):
        fit_on_predictions(fit_maps, manifest, cal_dir, fit)
    output = run_dir / "exports" / f"{split}_cal_{_fitted_name(fit)}"
    apply_to_predictions(cal_dir, source, output, progress=progress)
    return output


BASELINE_LOSS = "ce_dice"  # the usual nnU-Net-style recipe every comparison starts from
RECIPE_KEYS = ("loss", "calibrator", "region", "regime", "admissible", "score", "records", "complete")


@dataclass(frozen=True)
class Recipe:
    """The study's recommended recipe (``docs/results/recipe.yaml``, written by
    ``pipelines/calibration_study.py --tables-only`` from the committed records)."""

    loss: str
    calibrator: str
    region: str = ALL
    regime: str = "short"
    admissible: bool = True
    score: float | None = None  # the selection criterion (lower is better)
    records: int = 0  # study records it was chosen from
    complete: bool = False  # whether the study's must-have grid was complete

    def to_yaml(self) -> str:
        import yaml

        header = ("# The study's recommended recipe: written by `pipelines/calibration_study.py --tables-only` from\n"
                  "# docs/results/study (do not edit by hand); `segcalib demo` trains and calibrates with it.\n")
        return header + yaml.safe_dump({k: getattr(self, k) for k in RECIPE_KEYS}, sort_keys=False)


def read_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe file (safe YAML); errors name the file and the key."""
    from segcalib.calibrators import list_calibrators
    from segcalib.losses import list_losses
    from segcalib.spatial.regions import available_regions

    raw = read_yaml(path)
    unknown = sorted(set(raw) - set(RECIPE_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; a recipe has {list(RECIPE_KEYS)}")
    for key, choices in (("loss", list_losses()), ("calibrator", ["none", *list_calibrators()]),
                         ("region", available_regions())):
        if key not in raw and key != "region":
            raise ConfigError(f"{path}: {key}: missing")
        if key in raw and raw[key] not in choices:
            raise ConfigError(f"{path}: {key}: {raw[key]!r} is not one of {choices}")
    for key, kinds in (("regime", (str,)), ("admissible", (bool,)), ("complete", (bool,)), ("records", (int,)),
                       ("score", (int, float, type(None)))):
        if key in raw and (not isinstance(raw[key], kinds) or (bool not in kinds and isinstance(raw[key], bool))):
            raise ConfigError(f"{path}: {key}: {raw[key]!r} should be of type {' or '.join(k.__name__ for k in kinds)}")
    return Recipe(**raw)


def compare_losses(
    config: str | Path,
    root: Path,
    losses: Sequence[str],
    recipe: Recipe,
    overrides: Sequence[str] = (),
    temperature_regions: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, ExperimentResult]:
    """:func:`run_experiment` for ``config`` trained with each of ``losses`` (``root/<loss>``), each
    calibrated with ``recipe``'s calibrator on its fit region, then one comparison of every
    report (``root/comparison.html``)."""
    calibrator = None if recipe.calibrator == "none" else recipe.calibrator
    results = {}
    for loss in dict.fromkeys(losses):
        results[loss] = run_experiment(config, root / loss, [*overrides, f"loss.name={loss}"],
                                       temperature_regions=temperature_regions, calibrator=calibrator,
                                       calibrator_region=recipe.region, progress=progress, compare_reports=False)
    reports = [str(path) for result in results.values() for path in result.reports.values()]
    compare(reports, root)
    for result in results.values():
        result.comparison_html = root / "comparison.html"
    return results
