"""The members of an export: each a trained model with its own preprocessing and its own post-hoc
calibration (a temperature, or a calibrator fitted with ``segcalib calibrate fit``), and the
stream of member predictions per case (flips for test-time augmentation, MC-dropout passes).

Members are combined in probability space, after each member's calibration, by
:class:`segcalib.inference.ensemble.ProbabilityEnsemble`; only one member's full-volume output
and the running sums are in memory at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcalib.calibrators import Calibrator, load_calibrator, read_calibrator_json
from segcalib.calibrators.input_space import to_space, warn_unrecorded
from segcalib.data import Case, load_manifest
from segcalib.data.transforms import case_to_item, preprocessing
from segcalib.errors import ConfigError, DataError, RunError
from segcalib.export.geometry import to_file_geometry
from segcalib.inference.augmentation import Flip, flip_transforms, member_predictions
from segcalib.inference.sliding_window import predict_logits
from segcalib.inference.temperature import TemperatureRequest, VoxelSample, apply_temperature_, fit_temperature
from segcalib.inference.trained_model import TrainedModel
from segcalib.spatial.regions import RegionContext, region_mask
from segcalib.spatial.spacing import spacing_from_affine

log = logging.getLogger("segcalib")


@dataclass
class Member:
    """One model of an export and how its logits become calibrated probabilities."""

    model: TrainedModel
    temperature: float = 1.0
    calibrator: Calibrator | None = None
    fit_info: dict[str, Any] = field(default_factory=dict)
    chain: Any = None  # the model's preprocessing (made from its config when not given)

    def __post_init__(self) -> None:
        if self.chain is None:
            self.chain = preprocessing(self.model.cfg.data, with_label=False)

    def to_probs(self, logits: torch.Tensor, spacing: tuple[float, ...]) -> torch.Tensor:
        """Calibrated probabilities ``(B, K, *S)`` from this member's logits (float32; in place
        for a temperature)."""
        if self.calibrator is not None:  # logits convert exactly into either input space
            inputs = to_space(logits, "logits", self.calibrator.input_space, dim=1)
            return self.calibrator.transform(inputs, spacing=[spacing] * logits.shape[0])
        return apply_temperature_(logits.float(), self.temperature, dim=1)

    def describe(self) -> str:
        """This member's calibration in a few words (for a message about a bad map)."""
        if self.calibrator is not None:
            where = self.fit_info.get("folder", "")
            return f"calibrator '{self.calibrator.name}' of {where} ({self.calibrator.describe_params()})"
        return f"{self.model.run_dir} at temperature {self.temperature:.4g}"

    def record(self) -> dict[str, Any]:
        """The member as export.json describes it."""
        model = self.model
        out = {
            "run": str(model.run_dir.resolve()),
            "model": model.cfg.model.name,
            "loss": model.cfg.loss.name,
            "checkpoint": str(Path(model.checkpoint).resolve()),
            "checkpoint_epoch": model.epoch,
            **model.record(),  # run_finished, foreign_checkpoint (and its own config)
            "manifest": str(Path(model.cfg.data.manifest).resolve()),
            "config_hash": model.config_hash,
            "temperature": self.temperature if self.calibrator is None else None,
            "temperature_fit": self.fit_info if self.calibrator is None else None,
        }
        if self.calibrator is not None:
            out["calibrator"] = {"method": self.calibrator.name, **self.fit_info}
        return out


def note_member_provenance(members: Sequence[Member]) -> list[str]:
    """One warning line when the members of an ensemble were trained on different manifests or
    configs (beyond ``name`` and ``train.seed``, which make a seed ensemble); returns what differs."""
    if len(members) < 2:
        return []
    flat = [_flatten(m.model.cfg.to_dict()) for m in members]
    keys = sorted({k for f in flat for k in f} - {"name", "train.seed"})
    changed = [k for k in keys if any(f.get(k) != flat[0].get(k) for f in flat[1:])]
    if changed:
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        log.warning("ensemble members were trained with different settings (%s); export.json records each "
                    "member's manifest and config hash", shown)
    return changed


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def calibrate_member(
    model: TrainedModel,
    request: TemperatureRequest,
    calibrator_dir: str | Path | None,
    max_voxels: int,
    boundary_mm: float,
) -> Member:
    """The member of ``model``: a given or fitted temperature, or a saved calibrator."""
    if calibrator_dir is not None:
        record = read_calibrator_json(calibrator_dir)
        calibrator = load_calibrator(calibrator_dir)
        if calibrator.num_classes != model.num_classes:
            raise DataError(
                f"{calibrator_dir}: a calibrator of {calibrator.num_classes} classes; {model.run_dir} predicts {model.num_classes}"
            )
        if getattr(calibrator, "use_image", False):
            raise ConfigError(
                f"{calibrator_dir}: the '{calibrator.name}' calibrator reads the image as the raw files hold it; "
                "export maps (--logits) and use segcalib calibrate apply --manifest instead"
            )
        if calibrator.input_space is None:
            warn_unrecorded(str(calibrator_dir))
        info = {"folder": str(Path(calibrator_dir).resolve()), "region": record.get("fit_region", record.get("region")),
                "params": record.get("params"), "input_space": calibrator.input_space}
        return Member(model, calibrator=calibrator, fit_info=info)
    if request.mode != "fit":
        return Member(model, temperature=request.value, fit_info={"mode": request.mode})
    sample, n_cases = collect_validation_voxels(model, request.region, max_voxels, boundary_mm)
    try:
        t = fit_temperature(sample.logits, sample.targets)
    except ValueError as exc:  # non-finite logits: the checkpoint holds NaN weights
        raise RunError(f"{model.checkpoint}: temperature fit on {request.region} validation voxels failed: {exc}") from None
    log.info("%s: temperature fitted on %d %s validation voxels: T = %.4f", model.run_dir, len(sample), request.region, t)
    info = {"mode": "fit", "region": request.region, "voxels_used": len(sample), "voxels_offered": sample.offered,
            "validation_cases": n_cases}
    return Member(model, temperature=t, fit_info=info)


def collect_validation_voxels(
    model: TrainedModel, region: str, max_voxels: int, boundary_mm: float
) -> tuple[VoxelSample, int]:
    """A seeded voxel sample (logits, labels) of the run's own validation cases in ``region``,
    and the number of cases it was drawn from."""
    cfg = model.cfg
    manifest = load_manifest(cfg.data.manifest, split_seed=cfg.data.split_seed)
    cases = [c for c in manifest.cases("validation") if c.label is not None]
    if not cases:
        raise DataError(f"{manifest.path}: --temperature fit needs labelled validation cases; the run's manifest has none")
    chain = preprocessing(cfg.data, with_label=True)
    sample = VoxelSample(max_voxels=max_voxels, seed=cfg.train.seed)
    for case in cases:
        item = chain(case_to_item(case))
        image, label = item["image"], item["label"]
        logits = predict_logits(model.net, image.unsqueeze(0), model.window, device=model.device)
        target = label.as_tensor().long().to(logits.device)  # (1, *spatial) = (B, *spatial)
        spacing = [spacing_from_affine(image.affine)]
        context = RegionContext(target=target, spacing=spacing, num_classes=model.num_classes, boundary_mm=boundary_mm)
        sample.add(logits, target, region_mask(region, context))
    if len(sample) == 0:
        raise DataError(f"{manifest.path}: no validation voxels in region {region!r} to fit a temperature on")
    return sample, len(cases)


def tta_flips(model: TrainedModel, request: str | Sequence[int] | None) -> list[Flip] | None:
    """The flips of ``--tta``: ``"flips"`` = every combination of the axes the model was trained
    to be invariant to (its augmentation's flip axes), or the explicit axes given; None: none."""
    if request is None:
        return None
    dims = model.cfg.data.spatial_dims
    if request == "flips":
        augment = model.cfg.data.augment
        if augment.flip_prob <= 0 or not augment.flip_axes:
            raise ConfigError(
                f"--tta flips: {model.run_dir} was not trained with flips (data.augment.flip_prob = "
                f"{augment.flip_prob}); name the axes with --tta-axes if the task is symmetric"
            )
        axes = [a for a in augment.flip_axes if a < dims]
    else:
        axes = [int(a) for a in request]
        bad = [a for a in axes if not 0 <= a < dims]
        if bad:
            raise ConfigError(f"--tta-axes: {bad} are not spatial axes of a {dims}D model (0..{dims - 1})")
    return flip_transforms(dims, axes)


def member_maps(
    member: Member, case: Case, flips: list[Flip] | None, mc_samples: int, logits_out: list | None = None
) -> Iterator[np.ndarray]:
    """This member's calibrated probability maps of ``case``, one prediction at a time, each
    ``(K, *file_spatial)`` in the input file's voxel order (often a view). With ``logits_out`` (one
    prediction: no flips, no MC dropout), the raw logits in file order are appended to it too, from
    the same inference."""
    model = member.model
    item = member.chain(case_to_item(case))
    image = item["image"]
    spacing = spacing_from_affine(image.affine)

    def predict(x: torch.Tensor) -> torch.Tensor:
        logits = predict_logits(model.net, x, model.window, device=model.device)
        if logits_out is not None:
            raw = logits[0].detach().cpu().clone()  # the calibration below works in place
            logits_out.append(np.ascontiguousarray(to_file_geometry(raw, image, member.chain, probabilities=False)))
        return logits

    def to_probs(logits: torch.Tensor) -> torch.Tensor:
        return member.to_probs(logits, spacing).cpu()

    predictions = member_predictions(
        predict, image.unsqueeze(0), tta=flips or False, mc_samples=mc_samples,
        model=model.net if mc_samples > 1 else None, to_probs=to_probs,
    )
    for probs in predictions:
        yield to_file_geometry(probs[0], image, member.chain)
