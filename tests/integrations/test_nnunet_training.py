"""A real nnU-Net run on CPU: plan and preprocess a tiny 2D dataset with nnunetv2's own API, find
the trainer through ``nnUNet_extTrainer`` as ``nnUNetv2_train`` does, train one epoch with CALS
(generic trainer, ``SEGCALIB_LOSS``), continue for a second from ``checkpoint_final.pth``.

nnU-Net's closing full-volume validation (``perform_actual_validation``, a spawn pool of exporters)
is not run: it is nnU-Net's code, untouched by the trainers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2")

DATASET_ID, DATASET = 991, "Dataset991_Tiny"


def write_raw_dataset(raw: Path, n: int = 6) -> None:
    """Discs of class 1 with a class-2 core on noisy 40x40 single-slice images."""
    import SimpleITK as sitk

    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :40]
    for i in range(n):
        cy, cx = rng.integers(12, 28, 2)
        r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        label = np.zeros((1, 40, 40), np.uint8)
        label[0][r2 < 49] = 1
        label[0][r2 < 9] = 2
        image = (label + 0.3 * rng.standard_normal(label.shape)).astype(np.float32)
        for array, path in ((image, raw / "imagesTr" / f"case{i}_0000.nii.gz"), (label, raw / "labelsTr" / f"case{i}.nii.gz")):
            sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    dataset = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": n,
               "file_ending": ".nii.gz"}
    (raw / "dataset.json").write_text(json.dumps(dataset))


@pytest.mark.slow
def test_one_epoch_of_nnunet_with_cals_then_a_second_from_the_checkpoint(tmp_path, monkeypatch) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )
    from nnunetv2.run.run_training import get_trainer_from_args

    from segcalib.integrations.nnunet import trainer_folder
    from segcalib.integrations.nnunet.trainers import CHECKPOINT_KEY, nnUNetTrainerSegcalib, _numpy_data_types

    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")  # planning sets torch's threads from it
    monkeypatch.setenv("nnUNet_compile", "0")
    threads = torch.get_num_threads()
    write_raw_dataset(tmp_path / "nnUNet_raw" / DATASET)
    try:
        extract_fingerprint_dataset(DATASET_ID, num_processes=1, show_progress_bar=False, verbose=False)
        plan_experiment_dataset(DATASET_ID)
        preprocess_dataset(DATASET_ID, configurations=("2d",), num_processes=[1], show_progress_bar=False)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # data augmentation in this process
    monkeypatch.setenv("nnUNet_extTrainer", str(trainer_folder()))
    monkeypatch.setenv("SEGCALIB_LOSS", "cals")
    monkeypatch.setenv("SEGCALIB_LOSS_PARAMS", json.dumps({"margin": 0.5}))  # small: the untrained net violates it

    def trainer(epochs: int):
        made = get_trainer_from_args(str(DATASET_ID), "2d", 0, "nnUNetTrainerSegcalib", device=torch.device("cpu"))
        assert isinstance(made, nnUNetTrainerSegcalib)
        made.num_iterations_per_epoch, made.num_val_iterations_per_epoch, made.num_epochs = 2, 2, epochs
        return made

    first = trainer(epochs=1)
    first.run_training()
    final = Path(first.output_folder) / "checkpoint_final.pth"
    with torch.serialization.safe_globals(_numpy_data_types()):
        saved = torch.load(final, map_location="cpu", weights_only=True)[CHECKPOINT_KEY]
    assert saved["name"] == "cals" and saved["params"] == {"margin": 0.5, "num_classes": 3}
    assert int(saved["state"]["epoch"]) == 1
    assert torch.all(saved["state"]["lambdas"] > 1e-3)  # the multipliers moved off lambda_min = 1e-6
    torch.testing.assert_close(saved["state"]["lambdas"], first.segcalib_loss.lambdas)
    log = Path(first.log_file).read_text()
    assert "segcalib loss 'cals' with num_classes=3, margin=0.5" in log and "segcalib cals: lambda_0=" in log

    second = trainer(epochs=2)
    second.load_checkpoint(str(final))  # as nnUNetv2_train --c does
    torch.testing.assert_close(second.segcalib_loss.lambdas, first.segcalib_loss.lambdas)
    assert int(second.segcalib_loss.epoch) == 1 and second.current_epoch == 1
    second.run_training()
    assert int(second.segcalib_loss.epoch) == 2

    # plain nnU-Net inference finds the trainer class through nnUNet_extTrainer alone (no SEGCALIB_LOSS)
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    monkeypatch.delenv("SEGCALIB_LOSS")
    predictor = nnUNetPredictor(device=torch.device("cpu"), verbose=False)
    predictor.initialize_from_trained_model_folder(second.output_folder_base, use_folds=(0,),
                                                   checkpoint_name="checkpoint_final.pth")
    net = second.network.state_dict()
    assert all(torch.equal(v.cpu(), net[k].cpu()) for k, v in predictor.list_of_parameters[0].items())
