"""Minimal nnU-Net v2 plans and dataset.json for constructing trainers in tests (a tiny 2D U-Net,
4 stages, so nnU-Net's deep supervision has three scales with weights 4/7, 2/7, 1/7 before the
lowest is dropped)."""

from __future__ import annotations

import copy

DATASET = "Dataset990_SegcalibTest"
PATCH = [32, 32]
STRIDES = [[1, 1], [2, 2], [2, 2], [2, 2]]

_ARCH = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 4,
        "features_per_stage": [4, 8, 8, 8],
        "conv_op": "torch.nn.modules.conv.Conv2d",
        "kernel_sizes": [[3, 3]] * 4,
        "strides": STRIDES,
        "n_conv_per_stage": [1, 1, 1, 1],
        "n_conv_per_stage_decoder": [1, 1, 1],
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}

PLANS = {
    "dataset_name": DATASET,
    "plans_name": "nnUNetPlans",
    "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
    "original_median_shape_after_transp": [1, 32, 32],
    "image_reader_writer": "SimpleITKIO",
    "transpose_forward": [0, 1, 2],
    "transpose_backward": [0, 1, 2],
    "experiment_planner_used": "ExperimentPlanner",
    "label_manager": "LabelManager",
    "foreground_intensity_properties_per_channel": {
        "0": {"max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0, "percentile_00_5": -1.0,
              "percentile_99_5": 1.0, "std": 1.0}
    },
    "configurations": {
        "2d": {
            "data_identifier": "nnUNetPlans_2d",
            "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2,
            "patch_size": PATCH,
            "median_image_size_in_voxels": PATCH,
            "spacing": [1.0, 1.0],
            "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "architecture": _ARCH,
            "batch_dice": True,
        }
    },
}


def plans() -> dict:
    """A fresh copy (nnU-Net's trainer pops ``continue_training`` from the dict it is given)."""
    out = copy.deepcopy(PLANS)
    out["continue_training"] = False
    return out


def dataset_json(ignore: bool = False, regions: bool = False) -> dict:
    """Three classes (background, a, b); ``ignore`` adds nnU-Net's ignore label 3; ``regions``
    makes BraTS-style region labels."""
    labels: dict = {"background": 0, "a": 1, "b": 2}
    out = {"channel_names": {"0": "MRI"}, "labels": labels, "numTraining": 4, "file_ending": ".nii.gz"}
    if ignore:
        labels["ignore"] = 3
    if regions:
        out["labels"] = {"background": 0, "whole": [1, 2], "core": 2}
        out["regions_class_order"] = [1, 2]
    return out
