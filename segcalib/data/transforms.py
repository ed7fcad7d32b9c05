"""MONAI transform chains: volume -> network input, for training, validation and inference.

- :func:`preprocessing` is deterministic and invertible (orientation, spacing, cropping are
  recorded on the MetaTensor), so exported maps can be put back into the input's own geometry.
- :func:`training_transforms` adds padding, pos/neg patch sampling and augmentation; in 2D mode
  the patches are single slices along ``data.slice_axis`` (the patch has size 1 there and that
  axis is squeezed away). It is two halves: :func:`training_volume_transforms` (deterministic:
  cached once per run, plain tensors) and :func:`patch_transforms` (random: run for every sample,
  on the training device, after moving the cached volume there).

Dictionaries carry ``image`` (``(C, *spatial)`` float32) and ``label`` (``(1, *spatial)``).
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from segcalib.config.schema import DataConfig
from segcalib.data.manifest import Case
from segcalib.data.volumes import read_volume

IMAGE, LABEL = "image", "label"


class LoadVolumed(mt.MapTransform):
    """Read a case's channel files and label with :func:`segcalib.data.volumes.read_volume`.

    Produces channel-first MetaTensors whose affine is the ITK-consistent one (spacing from
    ``pixdim``), so every later step measures in the same millimetres.
    """

    def __init__(self, keys: Sequence[str] = (IMAGE, LABEL), allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            paths = d[key] if isinstance(d[key], (list, tuple)) else [d[key]]
            channels, header = [], None
            for path in paths:
                array, header_i = read_volume(path, dtype=np.float32)
                header = header or header_i
                if array.ndim == 4:  # 4D NIfTI: channels last
                    channels.extend(np.moveaxis(array, -1, 0))
                elif array.ndim == 2:
                    channels.append(array[..., None])
                else:
                    channels.append(array)
            stacked = np.stack(channels)
            affine = torch.as_tensor(header.affine, dtype=torch.float64)
            meta = {
                "filename_or_obj": str(paths[0]),
                "original_affine": affine.clone(),
                "spatial_shape": np.asarray(stacked.shape[1:]),
                "original_channel_dim": 0,
                "space": "RAS",
            }
            d[key] = MetaTensor(torch.from_numpy(stacked), affine=affine, meta=meta)
        return d


def case_to_item(case: Case) -> dict[str, Any]:
    """The dict a transform chain starts from."""
    item: dict[str, Any] = {IMAGE: [str(p) for p in case.images], "case_id": case.case_id}
    if case.label is not None:
        item[LABEL] = str(case.label)
    return item


def preprocessing(cfg: DataConfig, with_label: bool = True) -> mt.Compose:
    """Deterministic, invertible chain: load, orientation, spacing, intensity, optional crop."""
    keys = [IMAGE, LABEL] if with_label else [IMAGE]
    steps: list[mt.Transform] = [LoadVolumed(keys)]
    if cfg.orientation:
        steps.append(mt.Orientationd(keys=keys, axcodes=cfg.orientation, labels=None))
    if cfg.spacing:
        modes = ["bilinear", "nearest"][: len(keys)]
        steps.append(mt.Spacingd(keys=keys, pixdim=cfg.spacing, mode=modes, dtype=np.float32))
    steps.append(_intensity(cfg))
    if cfg.crop_foreground:
        steps.append(mt.CropForegroundd(keys=keys, source_key=IMAGE, margin=4, allow_smaller=True))
    return mt.Compose(steps)


def training_transforms(cfg: DataConfig) -> mt.Compose:
    """The whole training chain, uncached: preprocessing, padding to the patch, pos/neg patch
    sampling, augmentation (2D: slices). Its random steps are the ones of :func:`patch_transforms`,
    in the same order, so both draw the same samples from the same seed."""
    steps: list[mt.Transform] = [*preprocessing(cfg).transforms, _pad_to_patch(cfg)]
    steps.extend(patch_transforms(cfg).transforms)
    return mt.Compose(steps)


def training_volume_transforms(cfg: DataConfig) -> mt.Compose:
    """The deterministic half of the training chain, cached once per run: preprocessing and
    padding to the patch, as plain tensors (training needs no geometry, and a plain tensor is
    cheaper to move to the device and to crop)."""
    steps: list[mt.Transform] = [*preprocessing(cfg).transforms, _pad_to_patch(cfg)]
    steps.append(mt.EnsureTyped(keys=[IMAGE, LABEL], track_meta=False))
    return mt.Compose(steps)


def patch_transforms(cfg: DataConfig, device: torch.device | None = None) -> mt.Compose:
    """The random half, run for every sample: the volume moved to ``device`` (when given and not
    the CPU, so that the crops and augmentation run there), pos/neg patch sampling, the 2D squeeze,
    augmentation; patches come out as plain tensors."""
    keys = [IMAGE, LABEL]
    patch = patch_size_3d(cfg)
    steps: list[mt.Transform] = []
    if device is not None and torch.device(device).type != "cpu":
        steps.append(mt.ToDeviced(keys=keys, device=torch.device(device)))
    steps.append(
        mt.RandCropByPosNegLabeld(
            keys=keys,
            label_key=LABEL,
            spatial_size=patch,
            pos=cfg.positive_fraction,
            neg=1.0 - cfg.positive_fraction,
            num_samples=cfg.samples_per_volume,
        )
    )
    if cfg.mode == "2d":
        steps.append(mt.SqueezeDimd(keys=keys, dim=cfg.slice_axis + 1))
    steps.extend(_augmentation(cfg))
    steps.append(mt.EnsureTyped(keys=keys, track_meta=False))
    return mt.Compose(steps)


def _pad_to_patch(cfg: DataConfig) -> mt.Transform:
    return mt.SpatialPadd(keys=[IMAGE, LABEL], spatial_size=patch_size_3d(cfg))


def patch_size_3d(cfg: DataConfig) -> list[int]:
    """The patch in volume space: in 2D mode a slice (size 1 along ``slice_axis``)."""
    if cfg.mode == "3d":
        return list(cfg.patch_size)
    patch = list(cfg.patch_size)
    patch.insert(cfg.slice_axis, 1)
    return patch


def _intensity(cfg: DataConfig) -> mt.Transform:
    if cfg.normalize == "zscore":
        return mt.NormalizeIntensityd(keys=IMAGE, channel_wise=True)
    if cfg.normalize == "zscore_nonzero":
        return mt.NormalizeIntensityd(keys=IMAGE, nonzero=True, channel_wise=True)
    if cfg.normalize == "percentile":
        low, high = cfg.percentiles
        return mt.ScaleIntensityRangePercentilesd(
            keys=IMAGE, lower=low, upper=high, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
        )
    return mt.Identityd(keys=IMAGE)


def _augmentation(cfg: DataConfig) -> list[mt.Transform]:
    keys = [IMAGE, LABEL]
    aug = cfg.augment
    dims = cfg.spatial_dims
    if cfg.mode == "2d":
        # volume axes other than the slice axis, renumbered for the 2D patch
        axes = [a - (a > cfg.slice_axis) for a in aug.flip_axes if a != cfg.slice_axis]
    else:
        axes = [a for a in aug.flip_axes if a < dims]
    steps: list[mt.Transform] = []
    if aug.flip_prob > 0:
        steps.extend(mt.RandFlipd(keys=keys, prob=aug.flip_prob, spatial_axis=a) for a in axes)
    if aug.rotate90_prob > 0:
        steps.append(mt.RandRotate90d(keys=keys, prob=aug.rotate90_prob, spatial_axes=(0, 1)))
    if aug.rotate_prob > 0:
        angle = math.radians(aug.rotate_degrees)
        ranges = {"range_x": angle} if dims == 2 else {"range_x": angle, "range_y": angle, "range_z": angle}
        steps.append(mt.RandRotated(keys=keys, prob=aug.rotate_prob, mode=["bilinear", "nearest"], **ranges))
    if aug.scale_intensity_prob > 0:
        steps.append(mt.RandScaleIntensityd(keys=IMAGE, factors=aug.scale_intensity, prob=aug.scale_intensity_prob))
    if aug.shift_intensity_prob > 0:
        steps.append(mt.RandShiftIntensityd(keys=IMAGE, offsets=aug.shift_intensity, prob=aug.shift_intensity_prob))
    if aug.noise_prob > 0:
        steps.append(mt.RandGaussianNoised(keys=IMAGE, prob=aug.noise_prob, std=aug.noise_std))
    return steps
