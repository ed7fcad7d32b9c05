"""``segcalib export``: calibrated probability maps of a split, in each input's own geometry.

Per case (in ``output``): the files of :mod:`segcalib.export.writers`. One run gives one member;
several runs (``--run`` given more than once: folds, seeds, losses with the same classes) form an
ensemble, each member with its own preprocessing, checkpoint and post-hoc calibration (a
temperature or a ``segcalib calibrate`` calibrator); test-time flips and MC-dropout passes add
members. Members are averaged in probability space after their calibration, streamed: one
member's full-volume output plus the running sums in memory. Ensembles also write the total
predictive entropy, the mutual information (epistemic) and the expected entropy (aleatoric).

Writing overlaps the prediction of the next case (``ExportOptions.overlap``; by default when the
model runs on a GPU, as on the CPU both would share the same cores): the maps of case i are
checked and written on a worker thread while case i+1 is predicted, one case behind (at most two
cases' maps in memory), with the same files byte for byte as one after the other; an error of
the writer stops the export at the next case and is raised here, after the writer has finished.
Every file is written under a temporary name and renamed; ``export.json`` records the members,
the combination rule, the post-hoc step, config hashes and versions. A rerun with the same
settings skips cases whose outputs are all there, reuses the recorded temperatures instead of
fitting them again, and leaves a complete export untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcalib.data import Case, check_manifest, load_manifest
from segcalib.data.volumes import header_rewritten
from segcalib.errors import ConfigError, DataError, RunError
from segcalib.export.members import Member, calibrate_member, member_maps, note_member_provenance, tta_flips
from segcalib.export.record import EXPORT_JSON, claimed_output, finish, now, previous_record, versions
from segcalib.export.writers import ENSEMBLE_MAPS, all_written, check_dtype, output_paths, write_probability_maps
from segcalib.inference.augmentation import active_dropout_layers
from segcalib.inference.ensemble import ProbabilityEnsemble
from segcalib.inference.temperature import DEFAULT_MAX_VOXELS, TemperatureRequest
from segcalib.inference.trained_model import load_trained_model
from segcalib.spatial.regions import DEFAULT_BOUNDARY_MM
from segcalib.utils.overlap import overlapped
from segcalib.utils.progress import progress_bar

log = logging.getLogger("segcalib")
__all__ = ["EXPORT_JSON", "ExportOptions", "ExportResult", "export", "export_case", "output_paths"]


@dataclass
class ExportOptions:
    split: str = "test"
    temperature: TemperatureRequest = field(default_factory=TemperatureRequest)
    calibrator: str | Path | None = None  # a `segcalib calibrate fit` folder, applied to each member
    checkpoint: str = "best"
    dtype: str = "float32"
    uncertainty: bool = False
    logits: bool = False  # also <case>_logits.nii.gz (one member, no TTA/MC), for `calibrate fit`
    tta: str | Sequence[int] | None = None  # "flips" (the trained flip axes) or explicit axes
    mc_dropout: int = 0  # dropout passes per member (0 or 1: none)
    variance: bool = False  # per-class variance over members (ensembles)
    max_fit_voxels: int = DEFAULT_MAX_VOXELS
    boundary_mm: float = DEFAULT_BOUNDARY_MM  # of the boundary region a temperature is fitted on
    device: str | None = None
    progress: bool = True
    allow_foreign_checkpoint: bool = False  # a checkpoint of another config: use the config it carries
    overlap: bool | None = None  # write case i on a worker thread while case i+1 is predicted; None: on a GPU


@dataclass
class ExportResult:
    output: Path
    cases: list[str]
    skipped: list[str]
    temperature: float | None
    info: dict[str, Any] = field(default_factory=dict)


def export(
    runs: str | Path | Sequence[str | Path], manifest_path: str | Path, output: str | Path, options: ExportOptions
) -> ExportResult:
    """Export probability maps for ``options.split`` of ``manifest_path`` into ``output``;
    ``runs`` is one run folder or several (an ensemble)."""
    output = Path(output)
    check_dtype(options.dtype)
    run_list = [runs] if isinstance(runs, (str, Path)) else list(runs)
    if not run_list:
        raise ConfigError("--run: give at least one run folder")
    models = [
        load_trained_model(r, options.checkpoint, options.device, options.allow_foreign_checkpoint) for r in run_list
    ]
    _check_same_classes(models)
    first = models[0]
    manifest = load_manifest(manifest_path, split_seed=first.cfg.data.split_seed)
    if manifest.num_classes != first.num_classes:
        raise DataError(f"{manifest.path}: declares {manifest.num_classes} classes but the model predicts {first.num_classes}")
    for model in models:
        model.check_inputs(manifest)  # channels, before export.json says "running"
    cases = manifest.cases(options.split)
    if not cases:
        raise DataError(f"{manifest.path}: split {options.split!r} has no cases")
    check_manifest(manifest, splits=(options.split,))
    flips = [tta_flips(m, options.tta) for m in models]
    mc = max(1, int(options.mc_dropout))
    if mc > 1:
        for model in models:  # before export.json says "running"
            active_dropout_layers(model.net, f"--mc-dropout {options.mc_dropout}: {model.run_dir}")
    n_predictions = len(models) * mc * max(1, len(flips[0] or [None]))
    if options.logits and n_predictions > 1:
        raise ConfigError("--logits writes one model's logits: not with several runs, --tta or --mc-dropout")
    extra = _extra_maps(options, n_predictions)

    request = _request(options, n_predictions)
    settings = _settings(models, manifest.path, options, request)
    previous = previous_record(output)
    reuse = previous is not None and previous.get("request") == request and _same(previous, settings)
    if reuse and previous.get("status") == "complete" and _complete(output, cases, extra):
        log.info("%s: complete export with these settings; nothing to do", output)
        return ExportResult(output, [], [c.case_id for c in cases], previous.get("temperature"), previous)
    members = [_member(m, options, previous["members"][i] if reuse else None) for i, m in enumerate(models)]
    settings["members"] = [m.record() for m in members]
    settings.update({k: settings["members"][0][k] for k in ("temperature", "temperature_fit")})
    note_member_provenance(members)

    done, skipped, to_write = [], [], []
    for case in cases:
        paths = output_paths(output, case.case_id, extra)
        (skipped if all_written(paths) else to_write).append(case.case_id)
    with claimed_output(output, settings, previous, _SAME_KEYS):
        bar = progress_bar(len(cases), "export", options.progress)
        bar.update(len(skipped))

        def written(case_id: str) -> None:
            done.append(case_id)
            bar.update(1)

        export_cases(members, flips, mc, [c for c in cases if c.case_id in to_write], output, extra, options, written)
        bar.close()
    settings["header_rewritten"] = [c.case_id for c in cases if header_rewritten(c.images[0])]
    finish(output, settings, [c.case_id for c in cases])
    return ExportResult(output, done, skipped, settings["temperature"], settings)


def export_cases(
    members: list[Member], flips: list, mc: int, cases: Sequence[Case], output: Path, extra: Sequence[str],
    options: ExportOptions, written: Callable[[str], None] = lambda case_id: None,
) -> None:
    """Predict and write the maps of ``cases`` into ``output``, in order, writing case i while case
    i+1 is predicted when ``options.overlap`` (None: when the first member runs on a GPU);
    ``written(case_id)`` after each case."""
    overlap = options.overlap if options.overlap is not None else members[0].model.device.type == "cuda"

    def predict(case: Case) -> tuple:
        return _predict_case(members, flips, mc, case, output_paths(output, case.case_id, extra), options)

    def write(case: Case, prepared: tuple) -> None:
        _write_case(members, case, output_paths(output, case.case_id, extra), options, *prepared)
        written(case.case_id)

    overlapped(cases, predict, write, enabled=overlap)


def _export_case(
    members: list[Member], flips: list, mc: int, case: Case, paths: dict[str, Path], options: ExportOptions
) -> None:
    """Predict one case with every member and write its maps (each file atomically)."""
    _write_case(members, case, paths, options, *_predict_case(members, flips, mc, case, paths, options))


def _predict_case(
    members: list[Member], flips: list, mc: int, case: Case, paths: dict[str, Path], options: ExportOptions
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The maps of one case ``(K, *spatial)`` in file order, and the extra maps asked for."""
    ensemble: ProbabilityEnsemble | None = None
    single = len(members) == 1 and mc == 1 and not flips[0]
    logits: list[np.ndarray] | None = [] if single and "logits" in paths else None
    for member, member_flips in zip(members, flips):
        for maps in member_maps(member, case, member_flips, mc, logits):
            if single:
                return maps, ({"logits": logits[0]} if logits else {})
            if ensemble is None:
                ensemble = ProbabilityEnsemble(variance=options.variance, dtype=torch.float32)
            ensemble.add(torch.from_numpy(np.ascontiguousarray(maps)).unsqueeze(0))
            del maps
    result = ensemble.result()
    extras = {name: getattr(result, name)[0].numpy() for name in ENSEMBLE_MAPS}
    if result.variance is not None:
        extras["variance"] = result.variance[0].numpy()
    return result.mean[0].numpy(), extras


def _write_case(
    members: list[Member], case: Case, paths: dict[str, Path], options: ExportOptions, maps: np.ndarray,
    extras: dict[str, np.ndarray],
) -> None:
    """Check and write one case's maps, each file atomically; a failing write names the case."""

    def producer() -> str:
        return "; ".join(m.describe() for m in members)

    try:
        write_probability_maps(maps, case.images[0], paths, options.dtype, extras, producer)
    except OSError as err:  # a full disk is a ResourceError already; the rest (permissions, I/O) named here
        folder = paths["probs"].parent
        raise RunError(
            f"{folder}: writing the maps of case {case.case_id} failed ({type(err).__name__}: {err}); "
            "the maps written before are complete and a rerun resumes from them"
        ) from err


def export_case(model, case: Case, chain, paths: dict[str, Path], temperature: float = 1.0, dtype: str = "float32") -> None:
    """Predict one case with one model at ``temperature`` and write its maps (``chain``: the
    model's preprocessing, as :func:`segcalib.data.transforms.preprocessing` makes it).

    Memory: the probabilities exist once (softmax in place, file order as a view where the
    geometry allows); the argmax and entropy maps are computed slab by slab."""
    member = Member(model, temperature=temperature, chain=chain)
    _export_case([member], [None], 1, case, paths, ExportOptions(dtype=check_dtype(dtype)))


def _member(model, options: ExportOptions, previous: dict[str, Any] | None) -> Member:
    """The member of ``model``; a rerun of the same request reuses its recorded temperature."""
    if previous is not None and options.calibrator is None and previous.get("temperature") is not None:
        return Member(model, temperature=float(previous["temperature"]), fit_info=previous.get("temperature_fit") or {})
    return calibrate_member(model, options.temperature, options.calibrator, options.max_fit_voxels, options.boundary_mm)


def _extra_maps(options: ExportOptions, n_predictions: int) -> list[str]:
    extra = ["uncertainty"] if options.uncertainty else []
    if options.logits:
        extra.append("logits")
    if n_predictions > 1:
        extra += list(ENSEMBLE_MAPS) + (["variance"] if options.variance else [])
    elif options.variance:
        raise ConfigError("--variance needs several members (runs, --tta or --mc-dropout)")
    return extra


def _complete(output: Path, cases: Sequence[Case], extra: list[str]) -> bool:
    return all(all_written(output_paths(output, c.case_id, extra)) for c in cases)


def _check_same_classes(models) -> None:
    names = models[0].class_names
    for m in models[1:]:
        if m.class_names != names:
            raise ConfigError(
                f"--run: {m.run_dir} predicts classes {m.class_names}, {models[0].run_dir} {names}; "
                "ensemble members need the same classes"
            )


def _request(options: ExportOptions, n_predictions: int) -> dict[str, Any]:
    """What the user asked for (not fitted values): a rerun with the same request reuses them."""
    temperature = options.temperature.record()
    if options.temperature.mode == "fit":
        temperature.update(max_voxels=options.max_fit_voxels, boundary_mm=options.boundary_mm)
    return {
        "temperature": temperature,
        "calibrator": str(Path(options.calibrator).resolve()) if options.calibrator is not None else None,
        "tta": options.tta if isinstance(options.tta, (str, type(None))) else [int(a) for a in options.tta],
        "mc_dropout": max(1, int(options.mc_dropout)),
        "predictions_per_case": n_predictions,
        "variance": options.variance,
        "logits": options.logits,
    }


_SAME_KEYS = ("checkpoints", "manifest", "split", "dtype", "uncertainty", "request")


def _same(previous: dict[str, Any], settings: dict[str, Any]) -> bool:
    return all(previous.get(k) == settings.get(k) for k in _SAME_KEYS)


def _settings(models, manifest: Path, options: ExportOptions, request: dict[str, Any]) -> dict[str, Any]:
    """The export record (members and their temperatures are added once known)."""
    first = models[0]
    return {
        "status": "running",
        "run": str(first.run_dir.resolve()),
        "model": first.cfg.model.name,
        "loss": first.cfg.loss.name,
        "checkpoint": str(Path(first.checkpoint).resolve()),
        "checkpoint_epoch": first.epoch,
        **first.record(),  # foreign_checkpoint (and its own config); each member's own: in "members"
        "run_finished": all(m.run_finished for m in models),
        "config_hash": first.config_hash,
        "checkpoints": [[str(Path(m.checkpoint).resolve()), m.epoch, m.config_hash] for m in models],
        "manifest": str(Path(manifest).resolve()),
        "split": options.split,
        "split_seed": first.cfg.data.split_seed,
        "request": request,
        "combination": {
            "rule": "mean of the members' calibrated probabilities" if request["predictions_per_case"] > 1 else "single model",
            "runs": len(models),
            "predictions_per_case": request["predictions_per_case"],
        },
        "boundary_mm": options.boundary_mm,
        "dtype": options.dtype,
        "uncertainty": options.uncertainty,
        "class_names": first.class_names,
        "device": str(first.device),
        "started": now(),
        "versions": versions(),
    }
