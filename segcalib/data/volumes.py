"""Read and write medical volumes with one consistent geometry everywhere.

NIfTI headers carry the voxel size twice: in ``pixdim`` and in the sform/qform matrix. Some public
datasets (ACDC, for one) ship a unit sform with the true spacing only in ``pixdim``; nibabel's
``affine`` then says 1 mm while ITK/SimpleITK read the true spacing. segcalib follows ITK:
spacing from ``pixdim``, direction and origin from the sform/qform. Every step (training,
export, metrics in mm) reads volumes through :func:`read_volume`, so they all agree.

Other formats that SimpleITK reads (``.mha``, ``.mhd``, ``.nrrd``) are read through SimpleITK and
converted to the same RAS+ world affine that nibabel uses.

A 2D file ``(H, W)`` is read as a single-slice volume ``(H, W, 1)``, so that 2D and 3D cases go
through the same code; maps written for it (:func:`save_like`) have the input's own
dimensionality again: ``(H, W)`` label and entropy maps, ``(H, W, 1, K)`` probabilities (the
class axis stays NIfTI's fourth, as for every input: a ``(H, W, K)`` file would be read by every
tool as K slices).

Maps of an input whose sform/qform disagree with ``pixdim`` are written with a self-consistent
header (sform and qform both the ITK-consistent affine, units mm), so that nibabel and MONAI
users read the true spacing from the maps (:func:`header_rewritten` says when).
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
    ndim: int = 3  # spatial dimensions of the file itself (2 for a single slice read as (H, W, 1))

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


def header_rewritten(reference: str | Path) -> bool:
    """True when maps written like ``reference`` get a rewritten, self-consistent header (its
    sform/qform spacing disagrees with ``pixdim``); the exporter records it in export.json."""
    return read_header(reference).spacing_disagrees


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
    if array.ndim == 2:
        array = array[..., None]  # (H, W) -> (H, W, 1), as the header says
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
    """Write ``array`` (reference's spatial shape as :func:`read_volume` gives it, optional
    trailing class axis) with the reference file's own geometry, so readers see the input's.

    The reference header (sform, qform with their codes, pixdim) is kept as it is, unless its
    sform/qform disagree with ``pixdim``: then both are set to the ITK-consistent affine and
    the units to mm. A 2D reference gets 2D label maps back (``(H, W, 1)`` -> ``(H, W)``).
    ``slope`` stores integer ``array`` values scaled by it (``scl_slope``): readers see floats.
    The caller makes ``path`` atomic (see :mod:`segcalib.utils.files`).
    """
    reference = Path(reference)
    array = np.asarray(array, dtype=dtype)
    if str(reference).lower().endswith(ITK_SUFFIXES):
        header, _ = _read_itk(reference, with_data=False)
        img = nib.Nifti1Image(_own_dimensionality(array, header.ndim), header.affine)
        img.header.set_xyzt_units("mm")
    else:
        source = _open_nifti(reference)
        header = _nifti_header(reference, source)
        hdr = source.header.copy()
        array = _own_dimensionality(array, header.ndim)
        hdr.set_data_dtype(array.dtype)
        hdr.set_data_shape(array.shape)
        hdr["scl_slope"] = np.nan
        hdr["scl_inter"] = np.nan
        img = nib.Nifti1Image(array, None, header=hdr)
        if header.spacing_disagrees:
            _make_self_consistent(img, header.affine, source.header)
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    nib.save(img, str(path))


def _own_dimensionality(array: np.ndarray, ndim: int) -> np.ndarray:
    """Drop the single-slice axis that :func:`read_volume` added to a 2D input from a label map."""
    if ndim == 2 and array.ndim == 3 and array.shape[2] == 1:
        return array[:, :, 0]
    return array


def _make_self_consistent(img: nib.Nifti1Image, affine: np.ndarray, source: nib.Nifti1Header) -> None:
    """sform and qform both ``affine`` (codes kept, unknown ones made scanner), units mm."""
    sform_code = int(source["sform_code"]) or 1
    qform_code = int(source["qform_code"]) or sform_code
    img.set_sform(affine, code=sform_code)
    img.set_qform(affine, code=qform_code)
    img.header.set_xyzt_units(xyz="mm", t=source.get_xyzt_units()[1])


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
    shape = tuple(int(s) for s in img.shape)
    return VolumeHeader(
        path=path,
        shape=shape + (1,) if len(shape) == 2 else shape,
        affine=affine,
        dtype=img.get_data_dtype(),
        header_spacing=header_spacing,
        ndim=min(len(shape), 3),
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
    # an Image says GetNumberOfComponentsPerPixel, a header-only reader GetNumberOfComponents
    components = image.GetNumberOfComponentsPerPixel() if with_data else image.GetNumberOfComponents()
    spatial_size = size + (1,) * (3 - dim)  # a 2D image is a single slice
    shape = spatial_size + ((components,) if components > 1 else ())
    array = None
    if with_data:
        # SimpleITK arrays are (z, y, x[, c]); nibabel's are (x, y, z[, c]).
        array = sitk.GetArrayFromImage(image)
        spatial = np.transpose(array, tuple(range(dim - 1, -1, -1)) + ((dim,) if components > 1 else ()))
        array = np.ascontiguousarray(spatial).reshape(shape)
    dtype = np.dtype(array.dtype) if array is not None else np.dtype(np.float32)
    return VolumeHeader(path=path, shape=shape, affine=affine, dtype=dtype, ndim=dim), array
