"""Read and write medical volumes with one consistent geometry everywhere.

NIfTI headers carry the voxel size twice: in ``pixdim`` and in the sform/qform matrix. Some public
datasets (ACDC, for one) ship a unit sform with the true spacing only in ``pixdim``; nibabel's
``affine`` then says 1 mm while ITK/SimpleITK read the true spacing. segcalib follows ITK:
spacing from ``pixdim``, direction and origin from the sform/qform. Every step (training,
export, metrics in mm) reads volumes through :func:`read_volume`, so they all agree.

Other formats that SimpleITK reads (``.mha``, ``.mhd``, ``.nrrd``) are read through SimpleITK and
converted to the same RAS+ world affine that nibabel uses.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from segcalib.errors import DataError
from segcalib.spatial.spacing import spacing_from_affine

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
SPACING_RTOL = 1e-3

# ITK uses LPS+ world coordinates, nibabel RAS+: flip the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class VolumeHeader:
    """Geometry of a volume without its voxels.

    ``affine`` maps voxel indices to RAS+ world millimetres (ITK-consistent, see module doc);
    ``shape`` is the spatial shape (a fourth entry is the channel count of a 4D file).
    """

    path: Path
    shape: tuple[int, ...]
    affine: np.ndarray
    dtype: np.dtype
    header_spacing: tuple[float, ...] | None = None  # the spacing nibabel's affine implies

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along the three spatial axes (file axis order)."""
        return spacing_from_affine(self.affine)

    @property
    def spacing_disagrees(self) -> bool:
        """True when the sform/qform scale and ``pixdim`` disagree (the file was fixed on read)."""
        if self.header_spacing is None:
            return False
        return not np.allclose(self.header_spacing, self.spacing, rtol=SPACING_RTOL, atol=1e-6)


def is_supported(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith(NIFTI_SUFFIXES) or name.endswith(ITK_SUFFIXES)


def read_header(path: str | Path) -> VolumeHeader:
    """Read the geometry of ``path`` (cheap: no voxel data is decoded for NIfTI files)."""
    path = Path(path)
    _require_file(path)
    if str(path).lower().endswith(ITK_SUFFIXES):
        return _read_itk(path, with_data=False)[0]
    img = _open_nifti(path)
    return _nifti_header(path, img)


def read_volume(path: str | Path, dtype: np.dtype | type | None = np.float32) -> tuple[np.ndarray, VolumeHeader]:
    """Load ``path`` as ``(array, header)``; the array is in file voxel order, ``(*spatial[, C])``.

    Raises :class:`DataError` naming the file when it is missing, truncated or not a volume.
    """
    path = Path(path)
    _require_file(path)
    if str(path).lower().endswith(ITK_SUFFIXES):
        header, array = _read_itk(path, with_data=True)
    else:
        img = _open_nifti(path)
        header = _nifti_header(path, img)
        try:
            array = np.asanyarray(img.dataobj)
        except (EOFError, OSError, zlib.error, ValueError) as exc:
            raise DataError(f"{path}: cannot read the voxel data (truncated or corrupt file: {exc})") from exc
    if dtype is not None:
        array = np.asarray(array, dtype=dtype)
    return array, header


def itk_consistent_affine(img: nib.Nifti1Image) -> np.ndarray:
    """The affine ITK would build: directions and origin from sform/qform, spacing from ``pixdim``."""
    affine = np.array(img.affine, dtype=np.float64)
    zooms = np.abs(np.asarray(img.header.get_zooms()[:3], dtype=np.float64))
    ndim = min(3, len(img.shape))
    columns = affine[:3, :3].copy()
    norms = np.linalg.norm(columns, axis=0)
    for axis in range(ndim):
        if norms[axis] == 0 or zooms[axis] == 0:
            continue  # degenerate header: keep what nibabel says
        columns[:, axis] = columns[:, axis] / norms[axis] * zooms[axis]
    affine[:3, :3] = columns
    return affine


def save_like(
    array: np.ndarray,
    reference: str | Path,
    path: str | Path,
    dtype: np.dtype | type,
    slope: float | None = None,
) -> None:
    """Write ``array`` (reference's spatial shape, optional trailing class axis) with the
    reference file's own header (sform, qform, pixdim), so readers see the same geometry.

    ``slope`` stores integer ``array`` values scaled by it (``scl_slope``): readers see floats.
    The caller makes ``path`` atomic (see :mod:`segcalib.utils.files`).
    """
    reference = Path(reference)
    array = np.asarray(array, dtype=dtype)
    if str(reference).lower().endswith(ITK_SUFFIXES):
        header, _ = _read_itk(reference, with_data=False)
        img = nib.Nifti1Image(array, header.affine)
    else:
        # A copy of the reference header keeps sform, qform (with their codes) and pixdim as they
        # are, so nibabel and SimpleITK read the output with the input's own geometry.
        hdr = _open_nifti(reference).header.copy()
        hdr.set_data_dtype(array.dtype)
        hdr.set_data_shape(array.shape)
        hdr["scl_slope"] = np.nan
        hdr["scl_inter"] = np.nan
        img = nib.Nifti1Image(array, None, header=hdr)
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    nib.save(img, str(path))


# -- internals ---------------------------------------------------------------------------------


def _require_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    if not path.is_file():
        raise DataError(f"{path}: is not a file")
    if not is_supported(path):
        raise DataError(f"{path}: unsupported format (expected {', '.join(NIFTI_SUFFIXES + ITK_SUFFIXES)})")


def _open_nifti(path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for damaged headers
        raise DataError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    if len(img.shape) < 2 or len(img.shape) > 4:
        raise DataError(f"{path}: expected a 2D, 3D or 4D (channels last) volume, got shape {img.shape}")
    return img


def _nifti_header(path: Path, img: nib.Nifti1Image) -> VolumeHeader:
    affine = itk_consistent_affine(img)
    header_spacing = spacing_from_affine(img.affine)
    return VolumeHeader(
        path=path,
        shape=tuple(int(s) for s in img.shape),
        affine=affine,
        dtype=img.get_data_dtype(),
        header_spacing=header_spacing,
    )


def _read_itk(path: Path, with_data: bool) -> tuple[VolumeHeader, np.ndarray | None]:
    import SimpleITK as sitk

    try:
        if with_data:
            image = sitk.ReadImage(str(path))
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            image = reader
    except RuntimeError as exc:
        raise DataError(f"{path}: SimpleITK cannot read it ({str(exc).strip().splitlines()[-1]})") from exc
    dim = image.GetDimension()
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    lps = np.eye(4)
    lps[:dim, :dim] = direction * spacing[None, :]
    lps[:dim, 3] = origin
    affine = _LPS_TO_RAS @ lps
    size = tuple(int(s) for s in image.GetSize())
    components = image.GetNumberOfComponentsPerPixel()
    shape = size + ((components,) if components > 1 else ())
    array = None
    if with_data:
        # SimpleITK arrays are (z, y, x[, c]); nibabel's are (x, y, z[, c]).
        array = sitk.GetArrayFromImage(image)
        spatial = np.transpose(array, tuple(range(dim - 1, -1, -1)) + ((dim,) if components > 1 else ()))
        array = np.ascontiguousarray(spatial)
    dtype = np.dtype(array.dtype) if array is not None else np.dtype(np.float32)
    return VolumeHeader(path=path, shape=shape, affine=affine, dtype=dtype), array
