"""2D and 3D segmentation networks by name: ``build_model(name, spatial_dims, in_channels, out_channels, **params)``."""

from segcalib.models.registry import (
    build_model,
    check_model_params,
    list_models,
    model_parameters,
    register_model,
    size_divisor,
)
from segcalib.utils.plugins import import_submodules

import_submodules(__name__, __path__, framework={"registry"})  # registers every model builder

__all__ = ["build_model", "check_model_params", "list_models", "model_parameters", "register_model", "size_divisor"]
