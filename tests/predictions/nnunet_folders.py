"""nnU-Net v2 prediction folders for tests: written by nnunetv2's own export code where it is
installed, else byte for byte as it writes them (``np.savez_compressed(probabilities=...)``, the
segmentation by SimpleITK with the image's spacing, origin and direction, a ``.pkl`` beside)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import SimpleITK as sitk

# An oblique, anisotropic, non-RAS direction (rows: x, y, z world axes in LPS; columns: image axes).
_ANGLE = np.deg2rad(25.0)
OBLIQUE = np.array(
    [[np.cos(_ANGLE), -np.sin(_ANGLE), 0.0], [np.sin(_ANGLE), np.cos(_ANGLE), 0.0], [0.0, 0.0, -1.0]]
)
SPACING = (0.7, 0.9, 3.0)
ORIGIN = (12.5, -30.0, 7.25)
LABELS = {"background": 0, "liver": 1, "tumour": 2}


def write_sitk(path: Path, array_zyx: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=OBLIQUE) -> Path:
    """Write a SimpleITK image from a ``(z, y, x)`` array with the given geometry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection(tuple(float(d) for d in np.asarray(direction).ravel()))
    sitk.WriteImage(image, str(path), True)
    return path


def blob_label_zyx(shape_zyx=(6, 11, 13), seed: int = 0) -> np.ndarray:
    """A label map with two foreground blobs, in SimpleITK's ``(z, y, x)`` order, asymmetric on purpose."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape_zyx], indexing="ij"), -1).astype(np.float64)
    label = np.zeros(shape_zyx, np.uint8)
    for k in (1, 2):
        centre = rng.uniform(0.25, 0.75, 3) * np.array(shape_zyx)
        radius = rng.uniform(0.2, 0.35, 3) * np.array(shape_zyx)
        label[(((grid - centre) / radius) ** 2).sum(-1) <= 1] = k
    label[0, 0, :3] = 2  # a corner marker that a flipped axis would move
    return label


def nnunet_logits(label_zyx: np.ndarray, seed: int = 0) -> np.ndarray:
    """Logits ``(C, z, y, x)`` whose argmax is the label: one-hot * 4 plus noise below 1."""
    rng = np.random.default_rng(seed)
    onehot = np.eye(len(LABELS), dtype=np.float32)[label_zyx].transpose(3, 0, 1, 2)
    return (4.0 * onehot + rng.uniform(-0.9, 0.9, onehot.shape)).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


def export_with_nnunetv2(out: Path, case_id: str, image: Path, logits_zyx: np.ndarray,
                         transpose_forward=(2, 0, 1), crop_margin: int = 1) -> np.ndarray:
    """Run nnunetv2's ``export_prediction_from_logits`` as ``nnUNetv2_predict --save_probabilities``
    does for one case: logits in nnU-Net's transposed, cropped frame go back to the image's own
    geometry. Returns the probabilities nnU-Net should write, ``(C, z, y, x)`` float64 (outside
    the crop box it writes background = 1)."""
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    data, props = SimpleITKIO().read_images([str(image)])
    tf = list(transpose_forward)
    tb = [int(i) for i in np.argsort(tf)]
    shape_t = [data.shape[1:][i] for i in tf]
    bbox = [[crop_margin, shape_t[0]], [0, shape_t[1] - crop_margin], [crop_margin, shape_t[2] - crop_margin]]
    props.update(shape_before_cropping=shape_t, bbox_used_for_cropping=bbox,
                 shape_after_cropping_and_before_resampling=[b - a for a, b in bbox])
    plans = {
        "dataset_name": "Dataset001_Test", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
        "transpose_forward": tf, "transpose_backward": tb, "label_manager": "LabelManager",
        "original_median_spacing_after_transp": [1, 1, 1], "original_median_shape_after_transp": shape_t,
        "experiment_planner_used": "ExperimentPlanner", "foreground_intensity_properties_per_channel": {},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "spacing": [props["spacing"][i] for i in tf],
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "architecture": {"network_class_name": "none", "arch_kwargs": {}, "_kw_requires_import": []},
        }},
    }
    dataset = {"labels": LABELS, "file_ending": ".nii.gz", "channel_names": {"0": "CT"}, "numTraining": 1}
    plans_manager = PlansManager(plans)
    # nnU-Net's frame: transposed, then cropped to the box
    frame = logits_zyx.transpose([0] + [i + 1 for i in tf])[(slice(None),) + tuple(slice(a, b) for a, b in bbox)]
    out.mkdir(parents=True, exist_ok=True)
    export_prediction_from_logits(torch.from_numpy(np.ascontiguousarray(frame)), props,
                                  plans_manager.get_configuration("3d_fullres"), plans_manager, dataset,
                                  str(out / case_id), save_probabilities=True, num_threads_torch=1)
    (out / "dataset.json").write_text(json.dumps(dataset))
    expected_t = np.zeros((len(LABELS), *shape_t))
    expected_t[0] = 1.0
    expected_t[(slice(None),) + tuple(slice(a, b) for a, b in bbox)] = softmax(frame)
    return expected_t.transpose([0] + [i + 1 for i in tb])


def write_like_nnunet(out: Path, case_id: str, probs_zyx: np.ndarray, reference: Path) -> None:
    """Write the files nnU-Net v2 writes for one case, without nnunetv2."""
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / f"{case_id}.npz", probabilities=probs_zyx.astype(np.float32))
    ref = sitk.ReadImage(str(reference))
    seg_array = probs_zyx.argmax(0).astype(np.uint8)
    if ref.GetDimension() == 2:  # as SimpleITKIO.write_seg: a 2D case is (1, y, x) until written
        seg_array = seg_array[0]
    seg = sitk.GetImageFromArray(seg_array)
    seg.CopyInformation(ref)
    sitk.WriteImage(seg, str(out / f"{case_id}.nii.gz"), True)
    with open(out / f"{case_id}.pkl", "wb") as f:
        pickle.dump({"spacing": list(ref.GetSpacing())[::-1]}, f)


class CreatesFile:
    """Unpickling this creates ``path`` (``open(path, "w")``): proof that someone ran the pickle."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))
