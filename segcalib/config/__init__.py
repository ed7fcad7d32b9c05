"""Experiment configs: the schema (:mod:`~segcalib.config.schema`) and the loader
(:mod:`~segcalib.config.loader`: safe YAML, ``base:``, ``--set``, registry checks)."""

from segcalib.config.schema import (
    AugmentConfig,
    DataConfig,
    ExperimentConfig,
    InferenceConfig,
    LossConfig,
    ModelConfig,
    TrainConfig,
)

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "ExperimentConfig",
    "InferenceConfig",
    "LossConfig",
    "ModelConfig",
    "TrainConfig",
    "load_config",
    "parse_overrides",
    "read_yaml",
]

_LOADER_NAMES = ("load_config", "parse_overrides", "read_yaml")


def __getattr__(name: str):
    # the loader needs the model and loss registries; the schema alone (DataConfig for
    # segcalib.data) must not pull them in, so the loader is imported on first use
    if name in _LOADER_NAMES:
        from segcalib.config import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'segcalib.config' has no attribute {name!r}")
