"""Experiment configs: YAML read with a safe loader, validated into a typed schema at load time.

Every key is known: an unknown key or a wrong type is a :class:`ConfigError` naming the dotted
key. ``--set key=value`` overrides any key (the value is parsed as YAML, so ``[32,32,32]`` and
``1.0e-3`` work). Model and loss parameters sit flat beside their ``name`` and are checked
against the registered builder's signature. Switching ``loss.name`` alone works: parameters
that the new loss does not take are dropped (with a note), the rest come from SPEC defaults, and
data-given ones (``num_classes``) are filled from the manifest at run time.

Relative paths in a YAML file are relative to that file's folder; in ``--set`` to the working
directory. A file may start from another with ``base: other.yaml`` and change only what differs
(sections merge key by key; a ``model`` or ``loss`` section naming another model/loss replaces
the base's section).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from segcalib.errors import ConfigError



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(_Strict):
    """Random augmentation of training patches (probabilities per patch)."""

    flip_prob: float = Field(0.5, ge=0, le=1)
    flip_axes: list[int] = Field(default_factory=lambda: [0, 1, 2])

    @field_validator("flip_axes")
    @classmethod
    def _axes(cls, v: list[int]) -> list[int]:
        if any(a not in (0, 1, 2) for a in v):
            raise ValueError(f"flip axes are 0, 1 or 2 (volume axes), got {v}")
        return v
    rotate90_prob: float = Field(0.0, ge=0, le=1)
    rotate_prob: float = Field(0.0, ge=0, le=1)
    rotate_degrees: float = Field(15.0, ge=0, le=180)
    scale_intensity_prob: float = Field(0.0, ge=0, le=1)
    scale_intensity: float = Field(0.1, ge=0)
    shift_intensity_prob: float = Field(0.0, ge=0, le=1)
    shift_intensity: float = Field(0.1, ge=0)
    noise_prob: float = Field(0.0, ge=0, le=1)
    noise_std: float = Field(0.05, ge=0)


class DataConfig(_Strict):
    """Where the cases are and how volumes become network inputs."""

    manifest: Path
    mode: Literal["3d", "2d"] = "3d"
    slice_axis: int = Field(2, ge=0, le=2, description="2D mode: the axis (after orientation) slices are cut along")
    orientation: str | None = "RAS"
    spacing: list[float] | None = Field(None, description="target voxel size in mm, None keeps the data's")
    normalize: Literal["zscore", "zscore_nonzero", "percentile", "none"] = "zscore"
    percentiles: tuple[float, float] = (0.5, 99.5)
    crop_foreground: bool = False
    patch_size: list[int] = Field(default_factory=lambda: [64, 64, 64])
    samples_per_volume: int = Field(2, ge=1)
    positive_fraction: float = Field(0.67, ge=0, le=1)
    cache_rate: float = Field(1.0, ge=0, le=1)
    num_workers: int = Field(0, ge=0)
    split_seed: int = 12345
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @field_validator("orientation")
    @classmethod
    def _axcodes(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.upper()
        if len(v) != 3 or sorted(v.replace("L", "R").replace("P", "A").replace("I", "S")) != ["A", "R", "S"]:
            raise ValueError(f"{v!r} is not an orientation code such as 'RAS' or 'LPS'")
        return v

    @field_validator("patch_size")
    @classmethod
    def _patch(cls, v: list[int]) -> list[int]:
        if any(s < 1 for s in v):
            raise ValueError(f"patch sizes must be positive, got {v}")
        return v

    @field_validator("spacing")
    @classmethod
    def _spacing(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) != 3 or any(s <= 0 for s in v)):
            raise ValueError("spacing needs three positive values in mm (or null to keep the data's)")
        return v

    @property
    def spatial_dims(self) -> int:
        return 3 if self.mode == "3d" else 2


class ModelConfig(BaseModel):
    """``name`` from the model registry; its parameters sit beside it."""

    model_config = ConfigDict(extra="allow")
    name: str = "unet"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class LossConfig(BaseModel):
    """``name`` from the loss registry; its parameters sit beside it (SPEC defaults otherwise)."""

    model_config = ConfigDict(extra="allow")
    name: str = "ce"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TrainConfig(_Strict):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(2, ge=1)
    seed: int = 0
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    momentum: float = Field(0.99, ge=0, lt=1)
    scheduler: Literal["none", "step", "cosine", "poly"] = "cosine"
    step_size: int = Field(30, ge=1, description="step scheduler: epochs between decays")
    step_gamma: float = Field(0.1, gt=0)
    poly_power: float = Field(0.9, gt=0)
    warmup_epochs: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)
    iterations_per_epoch: int | None = Field(None, ge=1, description="None: one pass over the training patches")
    amp: Literal["none", "bf16", "fp16"] = "bf16"
    grad_clip: float | None = Field(12.0, gt=0)
    val_every: int = Field(1, ge=1)
    best_metric: Literal["dice", "ece", "nll", "loss"] = "dice"
    deterministic: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = Field(1, ge=1)


class InferenceConfig(_Strict):
    roi_size: list[int] | None = Field(None, description="sliding-window ROI; None: the training patch size")

    @field_validator("roi_size")
    @classmethod
    def _roi(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(s < 1 for s in v):
            raise ValueError(f"ROI sizes must be positive, got {v}")
        return v

    overlap: float = Field(0.5, ge=0, lt=1)
    mode: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = Field(4, ge=1)
    amp: bool = True


class ExperimentConfig(_Strict):
    name: str = Field(..., min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)

    @model_validator(mode="after")
    def _check_consistency(self) -> "ExperimentConfig":
        dims = self.data.spatial_dims
        if len(self.data.patch_size) != dims:
            raise ValueError(f"data.patch_size: needs {dims} values in {self.data.mode} mode, got {self.data.patch_size}")
        roi = self.inference.roi_size
        if roi is not None and len(roi) != dims:
            raise ValueError(f"inference.roi_size: needs {dims} values in {self.data.mode} mode, got {roi}")
        from segcalib.models import check_model_params, size_divisor

        check_model_params(self.model.name, dims, self.model.params)
        divisor = size_divisor(self.model.name, self.model.params)
        for key, size in (("data.patch_size", self.data.patch_size), ("inference.roi_size", roi or [])):
            if any(s % divisor for s in size):
                raise ValueError(f"{key}: {size} must be a multiple of {divisor} for model {self.model.name!r}")
        _check_loss(self.loss)
        return self

    @property
    def roi_size(self) -> list[int]:
        return list(self.inference.roi_size or self.data.patch_size)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def config_hash(self) -> str:
        """sha256 of the canonical resolved config (first 16 hex digits)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _check_loss(loss: LossConfig) -> None:
    from segcalib.losses import list_losses, loss_parameters

    if loss.name not in list_losses():
        raise ConfigError(f"loss.name: unknown loss {loss.name!r}; registered losses: {', '.join(list_losses())}")
    allowed = loss_parameters(loss.name)
    for key in loss.params:
        if key not in allowed:
            raise ConfigError(
                f"loss.{key}: unknown parameter for loss {loss.name!r}; allowed: {', '.join(sorted(allowed)) or 'none'}"
            )


# -- loading -----------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader (no Python objects, no code)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file does not exist")
    if not path.is_file():
        raise ConfigError(f"{path}: is not a file (give the path of a YAML config)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from exc
    if raw is None:
        raise ConfigError(f"{path}: config file is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping of keys, got {type(raw).__name__}")
    return raw


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["train.epochs=3", "loss.name=mbls"]`` -> ``{"train.epochs": 3, "loss.name": "mbls"}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. train.epochs=10")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key] = value
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested mapping (a new copy; intermediate mappings are created)."""
    result = json.loads(json.dumps(raw, default=str))
    for key, value in overrides.items():
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return result


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] | dict[str, Any] = (),
    raw: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Load, override and validate an experiment config; errors name the file and dotted key."""
    source = Path(path) if path is not None else None
    if raw is None:
        if source is None:
            raise ConfigError("no config given")
        raw = read_yaml(source)
    label = str(source) if source is not None else "config"
    raw = _with_base(raw, source.parent if source is not None else Path.cwd(), seen=(source,))
    items = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    items = {k: (_absolute(v) if k == "data.manifest" and isinstance(v, str) else v) for k, v in items.items()}
    merged = apply_overrides(raw, items)
    if "loss.name" in items:
        merged = _drop_foreign_loss_params(merged)
    try:
        return ExperimentConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(f"{label}: " + _format_validation_error(exc)) from None
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc}") from None


def config_changes(saved: dict[str, Any], current: dict[str, Any], ignore: Sequence[str] = ("train.epochs",)) -> list[str]:
    """Dotted keys whose values differ between two config dicts (``ignore``d keys left out)."""
    changed: set[str] = set()

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in set(a) | set(b):
                walk(a.get(key), b.get(key), f"{prefix}{key}.")
        elif a != b and prefix.rstrip(".") not in ignore:
            changed.add(prefix.rstrip("."))

    walk(saved, current, "")
    return sorted(changed)


def _with_base(raw: dict[str, Any], folder: Path, seen: tuple[Path | None, ...]) -> dict[str, Any]:
    """Resolve relative paths of ``raw`` (a file in ``folder``) and merge it onto its ``base``."""
    raw = _resolve_paths(dict(raw), folder)
    base_name = raw.pop("base", None)
    if base_name is None:
        return raw
    if not isinstance(base_name, str):
        raise ConfigError(f"base: must be a path to another YAML config, got {base_name!r}")
    base_path = (folder / base_name).resolve()
    if base_path in seen:
        raise ConfigError(f"base: {base_path} includes itself")
    base = _with_base(read_yaml(base_path), base_path.parent, seen + (base_path,))
    return _merge(base, raw)


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in child.items():
        old = out.get(key)
        replaces_named = key in ("model", "loss") and isinstance(old, dict) and isinstance(value, dict) and (
            value.get("name", old.get("name")) != old.get("name")
        )
        if isinstance(old, dict) and isinstance(value, dict) and not replaces_named:
            out[key] = _merge(old, value)
        else:
            out[key] = value
    return out


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("manifest"), str):
        manifest = Path(data["manifest"]).expanduser()
        if not manifest.is_absolute():
            manifest = (base / manifest).resolve()
        raw = {**raw, "data": {**data, "manifest": str(manifest)}}
    return raw


def _absolute(value: str) -> str:
    return str(Path(value).expanduser().resolve())


def _drop_foreign_loss_params(merged: dict[str, Any]) -> dict[str, Any]:
    loss = merged.get("loss")
    if not isinstance(loss, dict) or not isinstance(loss.get("name"), str):
        return merged
    from segcalib.losses import list_losses, loss_parameters

    if loss["name"] not in list_losses():
        return merged
    allowed = loss_parameters(loss["name"])
    kept = {k: v for k, v in loss.items() if k == "name" or k in allowed}
    dropped = sorted(set(loss) - set(kept))
    if dropped:
        import logging

        logging.getLogger("segcalib").info(
            "loss.name=%s: dropping parameters of the previous loss: %s", loss["name"], ", ".join(dropped)
        )
    return {**merged, "loss": kept}


def _format_validation_error(exc: ValidationError) -> str:
    messages = []
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            messages.append(f"{key}: unknown key")
        elif error["type"] == "missing":
            messages.append(f"{key}: required key is missing")
        else:
            msg = error["msg"].removeprefix("Value error, ")
            if key and not msg.startswith(key.split(".")[0]):
                msg = f"{key}: {msg}"
            given = error.get("input")
            if error["type"] not in ("value_error", "assertion_error") and not isinstance(given, dict):
                msg += f" (got {given!r})"
            messages.append(msg)
    return "; ".join(messages)
