"""2D and 3D segmentation networks by name: ``build_model(name, spatial_dims, in_channels, out_channels, **params)``."""

from segcalib.models import monai_nets, smp_nets  # noqa: F401  (register the builders)
from segcalib.models.registry import (
    build_model,
    check_model_params,
    list_models,
    model_parameters,
    register_model,
    size_divisor,
)

__all__ = ["build_model", "check_model_params", "list_models", "model_parameters", "register_model", "size_divisor"]
