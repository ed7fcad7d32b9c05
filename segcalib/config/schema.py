"""Experiment config schema: the typed, validated shape of a YAML experiment (pydantic).

Every key is known: an unknown key or a wrong type is an error naming the dotted key. Model and
loss parameters sit flat beside their ``name``; their registries check them
(:func:`segcalib.config.loader.load_config` calls the registries and names the file).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator




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
    num_workers: int = Field(
        0, ge=0, le=256,
        description="worker processes running the random patch transforms when training on the CPU "
        "(0: the loader's thread); a GPU runs them itself. Patches depend on it, as in MONAI, so it "
        "has no machine-dependent default",
    )
    cache_workers: int | None = Field(
        None, ge=1, le=256, description="threads filling the cache of preprocessed volumes; None: one per core, up to 8"
    )
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
    amp_on_cpu: bool = Field(
        False,
        description="with amp: bf16, autocast to bf16 when training on a CPU that computes bf16 natively "
        "(AMX or AVX512-BF16; elsewhere float32, with a warning). Off by default: it changes CPU runs' numerics",
    )
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
        size = self.data.patch_size
        if self.data.augment.rotate90_prob > 0 and size[0] != size[1]:
            raise ValueError(
                f"data.augment.rotate90_prob: a quarter turn in the plane of patch axes 0 and 1 turns a patch of "
                f"data.patch_size {size} into {[size[1], size[0], *size[2:]]}, and patches of two shapes cannot "
                f"share a batch; make the first two sizes equal or set rotate90_prob: 0"
            )
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


def with_keys_added_since(saved: dict[str, Any]) -> dict[str, Any]:
    """A config dict written by an older segcalib, with the keys added to the schema since then
    filled in with their defaults, so that upgrading segcalib never makes an unfinished run
    "another config". Every key the old config had keeps its written value; a dict that no longer
    validates is returned as it is (and then differs where it differs)."""
    try:
        return ExperimentConfig.model_validate(saved).to_dict()
    except ValidationError:
        return saved

