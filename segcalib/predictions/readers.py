"""Read one prediction file into float32 ``(C, *spatial)`` values plus the geometry header.

- NIfTI maps (segcalib export, any 4D NIfTI): the class on the last axis (``channel_axis="last"``)
  or the first (``"first"``); the header's affine describes the spatial axes. 16-bit maps with
  ``scl_slope`` are scaled as nibabel scales them (float64 arithmetic, then float32).
- nnU-Net v2 ``--save_probabilities``: ``<case>.npz`` with ``probabilities`` ``(C, z, y, x)``
  (SimpleITK's array order) beside the segmentation whose header gives the geometry; the axes
  are reversed to nibabel's ``(C, x, y, z)``. The ``.npz`` is opened with ``allow_pickle=False``:
  nothing read from a prediction folder runs code (the ``.pkl`` files are never opened).

Memory: one case; at most the file's array plus the float32 result exist at once (an
uncompressed ``.nii`` is memory-mapped, so then only the result).
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from segcalib.data.volumes import VolumeHeader, read_header
from segcalib.errors import ConfigError, DataError

CHANNEL_AXES = ("last", "first")
NNUNET_KEY = "probabilities"


def check_channel_axis(value: str) -> str:
    if value not in CHANNEL_AXES:
        raise ConfigError(f"channel_axis: {value!r} is not one of {', '.join(CHANNEL_AXES)}")
    return value


def read_nifti_map(path: Path, channel_axis: str = "last") -> tuple[np.ndarray, VolumeHeader]:
    """Read a NIfTI map as ``(values (C, *spatial) float32, header)``; ``header.shape`` is the file's."""
    check_channel_axis(channel_axis)
    header = read_header(path)  # validates the file and gives the ITK-consistent affine
    if len(header.shape) < 3 or header.ndim == 2:  # a single 2D slice (read as (H, W, 1)): no class axis
        raise DataError(f"{path}: a probability/logit map needs a class axis, got shape {header.shape}")
    proxy = nib.load(str(path)).dataobj
    try:
        raw = proxy.get_unscaled()
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        raise DataError(f"{path}: cannot read the voxel data (truncated or corrupt file: {exc})") from exc
    slope, inter = float(proxy.slope), float(proxy.inter)
    scaled = (slope, inter) != (1.0, 0.0)
    axis = raw.ndim - 1 if channel_axis == "last" else 0
    n_classes = raw.shape[axis]
    if n_classes < 2:
        raise DataError(f"{path}: {n_classes} class on the {channel_axis} axis (shape {raw.shape}); a map needs two or more")
    classes = np.moveaxis(raw, axis, 0)  # a view: (C, *spatial)
    values = np.empty(classes.shape, dtype=np.float32)
    for c in range(n_classes):  # one class at a time, straight from the file's array: no temporaries
        if scaled:  # in float64 (buffered), as nibabel scales
            np.multiply(classes[c], slope, out=values[c], dtype=np.float64, casting="same_kind")
            if inter:
                values[c] += np.float32(inter)
        else:
            values[c] = classes[c]
    return values, header


def class_axis_hint(shape: tuple[int, ...], channel_axis: str, expected: int | None) -> str:
    """A hint for a map read with the wrong class axis: its other end has ``expected`` entries."""
    if expected is None or len(shape) < 2:
        return ""
    if channel_axis == "last" and shape[0] == expected and shape[-1] != expected:
        return f"; its first axis has {expected}: if the class axis is first, pass --channel-axis first"
    if channel_axis == "first" and shape[-1] == expected and shape[0] != expected:
        return f"; its last axis has {expected}: if the class axis is last, pass --channel-axis last"
    return ""


def nifti_class_count(path: Path, channel_axis: str = "last") -> tuple[int, tuple[int, ...]]:
    """``(classes, file shape)`` of a NIfTI map from its header alone (no voxel data read)."""
    shape = tuple(int(s) for s in read_header(path).shape)
    if len(shape) < 3:
        raise DataError(f"{path}: a probability/logit map needs a class axis, got shape {shape}")
    return (shape[-1] if channel_axis == "last" else shape[0]), shape


def nnunet_class_count(npz: Path) -> tuple[int, tuple[int, ...]]:
    """``(classes, array shape)`` of nnU-Net's ``probabilities`` from the ``.npy`` header inside the
    ``.npz`` (no voxel data read); complex or non-numeric arrays are refused here."""
    if not zipfile.is_zipfile(npz):
        raise DataError(f"{npz}: not a readable .npz file (not a zip archive)")
    try:
        with zipfile.ZipFile(npz) as archive:
            member = f"{NNUNET_KEY}.npy"
            if member not in archive.namelist():
                found = ", ".join(n[:-4] for n in archive.namelist() if n.endswith(".npy")) or "none"
                raise DataError(f"{npz}: no '{NNUNET_KEY}' array (found {found}); nnU-Net v2 writes it with "
                                "--save_probabilities")
            with archive.open(member) as stream:
                version = np.lib.format.read_magic(stream)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(stream)  # the header only
    except DataError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{npz}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    _check_real(npz, dtype)
    return (int(shape[0]) if shape else 0), tuple(int(s) for s in shape)


def _check_real(npz: Path, dtype: np.dtype) -> None:
    if dtype.kind == "c":
        raise DataError(f"{npz}: '{NNUNET_KEY}' holds complex numbers ({dtype}); probabilities are real")
    if dtype.kind not in "fiub":
        raise DataError(f"{npz}: '{NNUNET_KEY}' holds {dtype} values, not numbers")


def read_nnunet_map(npz: Path, segmentation: Path) -> tuple[np.ndarray, VolumeHeader]:
    """Read nnU-Net's ``probabilities`` from ``npz`` in the voxel order of ``segmentation``."""
    header = read_header(segmentation)
    array = _load_npz_key(npz, NNUNET_KEY)
    _check_real(npz, array.dtype)  # before any cast: numpy would drop the imaginary part with a warning
    spatial = tuple(header.shape[:3]) if len(header.shape) >= 3 else tuple(header.shape)
    if array.ndim == len(spatial) + 2 and array.shape[1] == 1:
        array = array[:, 0]  # a 2D case: nnU-Net keeps a leading singleton axis
    if array.ndim != len(spatial) + 1:
        raise DataError(
            f"{npz}: '{NNUNET_KEY}' has shape {array.shape}, not (C, *spatial) for the "
            f"{len(spatial)}D segmentation {segmentation}"
        )
    reverse = (0,) + tuple(range(array.ndim - 1, 0, -1))  # SimpleITK (C, z, y, x) -> nibabel (C, x, y, z)
    values = np.ascontiguousarray(array.transpose(reverse), dtype=np.float32)
    del array
    if values.shape[1:] != spatial:
        raise DataError(
            f"{npz}: probabilities of spatial shape {values.shape[1:]} (x, y, z) do not match the segmentation "
            f"{segmentation} of shape {spatial}"
        )
    if values.shape[0] < 2:
        raise DataError(f"{npz}: '{NNUNET_KEY}' has {values.shape[0]} class; a map needs two or more")
    return values, header


def _load_npz_key(npz: Path, key: str) -> np.ndarray:
    """One array of an ``.npz`` file, without pickle (object arrays are refused)."""
    if not npz.is_file():
        raise DataError(f"{npz}: file does not exist")
    if not zipfile.is_zipfile(npz):  # else np.load would take it for a pickle (and refuse it)
        raise DataError(f"{npz}: not a readable .npz file (not a zip archive)")
    try:
        with np.load(npz, allow_pickle=False) as archive:
            if key not in archive.files:
                raise DataError(
                    f"{npz}: no '{key}' array (found {', '.join(archive.files) or 'none'}); nnU-Net v2 writes it "
                    "with --save_probabilities"
                )
            return archive[key]
    except DataError:
        raise
    except ValueError as exc:  # object arrays need pickle, which is never allowed
        raise DataError(f"{npz}: '{key}' cannot be read without pickle ({exc})") from exc
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{npz}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
