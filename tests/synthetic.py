"""Small synthetic NIfTI datasets for tests (written to a temporary folder)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

LPS_ANISO = np.array(
    [[-0.8, 0.0, 0.0, 10.0], [0.0, -0.8, 0.0, -20.0], [0.0, 0.0, 2.5, 5.0], [0.0, 0.0, 0.0, 1.0]]
)


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write ``array`` with ``affine`` (sform and qform both set, code 1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.eye(4) if affine is None else affine
    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, 1)
    img.set_qform(affine, 1)
    nib.save(img, str(path))
    return path


def blob_case(shape: Sequence[int] = (20, 24, 16), seed: int = 0, n_classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """An image/label pair with ellipsoidal foreground classes and a bright foreground."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    for k in range(1, n_classes):
        centre = rng.uniform(0.3, 0.7, size=3) * np.array(shape)
        radius = rng.uniform(0.12, 0.2, size=3) * np.array(shape)
        inside = (((grid - centre) / radius) ** 2).sum(-1) <= 1
        label[inside] = k
    image = (rng.normal(0, 0.3, size=shape) + label * 2.0 + 10.0).astype(np.float32)
    return image, label


def make_dataset(
    root: Path,
    n_cases: int = 6,
    shape: Sequence[int] = (20, 24, 16),
    affine: np.ndarray | None = None,
    splits: dict[str, int] | None = None,
    n_classes: int = 3,
) -> Path:
    """Write an MSD-style dataset (imagesTr/labelsTr + dataset.json); returns the manifest path."""
    entries = []
    for i in range(n_cases):
        image, label = blob_case(shape, seed=i, n_classes=n_classes)
        write_nifti(root / "imagesTr" / f"case_{i:03d}.nii.gz", image, affine)
        write_nifti(root / "labelsTr" / f"case_{i:03d}.nii.gz", label, affine)
        entries.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    manifest: dict = {
        "name": "Synthetic",
        "labels": {str(k): ("background" if k == 0 else f"class{k}") for k in range(n_classes)},
        "modality": {"0": "MRI"},
    }
    if splits is None:
        manifest["training"] = entries
    else:
        start = 0
        for split, n in splits.items():
            manifest[split] = entries[start : start + n]
            start += n
    path = root / "dataset.json"
    path.write_text(json.dumps(manifest, indent=1))
    return path
