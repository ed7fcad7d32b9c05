"""Put maps computed on preprocessed volumes back into the input file's own voxel grid.

The preprocessing chain records every spatial step (orientation, resampling, cropping) on the
image MetaTensor; inverting it on a probability map undoes them, so the exported map has the
input's shape and affine. Probabilities are renormalised afterwards: resampling is linear (it
keeps sums at 1) but voxels outside a foreground crop come back empty and become background.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from segcalib.errors import DataError

AFFINE_TOL = 1e-3


def to_file_geometry(maps: torch.Tensor, image: MetaTensor, chain: Compose) -> torch.Tensor:
    """``maps (K, *spatial_preprocessed)`` -> ``(K, *spatial_file)`` in the file's voxel order.

    ``image`` is the preprocessed image that ``chain`` produced (it carries the applied operations).
    """
    meta = {k: copy.deepcopy(v) for k, v in image.meta.items() if k != "affine"}
    pred = MetaTensor(maps.detach().cpu(), affine=image.affine.clone(), meta=meta)
    pred.applied_operations = copy.deepcopy(image.applied_operations)
    inverted = chain.inverse({"image": pred})["image"]
    original = torch.as_tensor(image.meta["original_affine"], dtype=torch.float64)
    restored = torch.as_tensor(inverted.affine, dtype=torch.float64)
    if not torch.allclose(restored, original, atol=AFFINE_TOL):
        raise DataError(
            f"{image.meta.get('filename_or_obj')}: could not map the prediction back to the input grid "
            f"(affine {restored.tolist()} vs {original.tolist()})"
        )
    return inverted.as_tensor()


def renormalise(probs: torch.Tensor) -> torch.Tensor:
    """Clamp to >= 0, make empty voxels background, divide by the sum over classes (axis 0), in place."""
    probs.clamp_(min=0)
    total = probs.sum(0)
    empty = total <= 0
    if empty.any():
        probs[0][empty] = 1.0
        total[empty] = 1.0
    probs.div_(total.unsqueeze(0))
    return probs


def channels_last(maps: torch.Tensor) -> np.ndarray:
    """``(K, *spatial)`` -> ``(*spatial, K)`` NumPy view for a 4D NIfTI with the class last."""
    return np.moveaxis(maps.numpy(), 0, -1)
