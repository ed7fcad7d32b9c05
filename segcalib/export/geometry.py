"""Put maps computed on preprocessed volumes back into the input file's own voxel grid.

The preprocessing chain records every spatial step (orientation, resampling, cropping) on the
image MetaTensor. When the preprocessed grid is the file's grid up to axis permutations and
flips (orientation only, the common case), the map is returned as a NumPy *view* in file
order: no copy of the volume is made. Otherwise the chain's recorded inverse is applied (MONAI
``Compose.inverse``), which resamples; probabilities are renormalised afterwards (linear
resampling keeps sums at 1, but voxels outside a foreground crop come back empty and become
background).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from segcalib.errors import DataError

AFFINE_TOL = 1e-3


def to_file_geometry(
    maps: torch.Tensor, image: MetaTensor, chain: Compose, probabilities: bool = True
) -> np.ndarray:
    """``maps (K, *spatial_preprocessed)`` -> ``(K, *spatial_file)`` in the file's voxel order.

    ``image`` is the preprocessed image that ``chain`` produced (it carries the applied
    operations and the file's affine). The result may be a view of ``maps``. Resampled
    probabilities are renormalised (``probabilities``); other maps (logits) are not.
    """
    original = np.asarray(image.meta["original_affine"], dtype=np.float64)
    file_shape = tuple(int(s) for s in image.meta["spatial_shape"])
    view = _axis_view(maps, np.asarray(image.affine, dtype=np.float64), original, file_shape)
    if view is not None:
        return view
    meta = {k: copy.deepcopy(v) for k, v in image.meta.items() if k != "affine"}
    pred = MetaTensor(maps.detach().cpu(), affine=image.affine.clone(), meta=meta)
    pred.applied_operations = copy.deepcopy(image.applied_operations)
    inverted = chain.inverse({"image": pred})["image"]
    restored = np.asarray(inverted.affine, dtype=np.float64)
    if not np.allclose(restored, original, atol=AFFINE_TOL):
        raise DataError(
            f"{image.meta.get('filename_or_obj')}: could not map the prediction back to the input grid "
            f"(affine {restored.tolist()} vs {original.tolist()})"
        )
    restored_maps = inverted.as_tensor().float()
    return (renormalise(restored_maps) if probabilities else restored_maps).numpy()


def _axis_view(maps: torch.Tensor, affine: np.ndarray, original: np.ndarray, file_shape: tuple[int, ...]) -> np.ndarray | None:
    """A view of ``maps`` in file order if the grids differ only by axis permutations and flips."""
    relation = np.linalg.solve(original, affine)  # preprocessed voxel index -> file voxel index
    rotation, offset = relation[:3, :3], relation[:3, 3]
    rounded = np.rint(rotation)
    if not np.allclose(rotation, rounded, atol=1e-4) or np.abs(rounded).sum() != 3:
        return None
    if not (np.abs(rounded).sum(0) == 1).all() or not (np.abs(rounded).sum(1) == 1).all():
        return None
    array = maps.detach().cpu().numpy()
    order = [int(np.flatnonzero(rounded[a])[0]) for a in range(3)]  # file axis a <- preprocessed axis order[a]
    view = np.transpose(array, [0] + [o + 1 for o in order])
    if view.shape[1:] != file_shape:
        return None
    for a in range(3):
        sign = rounded[a, order[a]]
        expected = 0.0 if sign > 0 else file_shape[a] - 1.0
        if abs(offset[a] - expected) > 1e-3:
            return None
        if sign < 0:
            view = np.flip(view, axis=a + 1)
    return view


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


def channels_last(maps: np.ndarray) -> np.ndarray:
    """``(K, *spatial)`` -> ``(*spatial, K)`` view for a 4D NIfTI with the class last."""
    return np.moveaxis(maps, 0, -1)
