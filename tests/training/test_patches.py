"""The training input pipeline: cached volumes + random patches on the device (ThreadDataLoader)
draw exactly the batches of the uncached chain with the plain DataLoader, for the same seed."""

from __future__ import annotations

import pytest
import torch
from monai.data import CacheDataset

from segcalib.config import load_config
from segcalib.data import load_manifest
from segcalib.data.datasets import PatchDataset, patch_workers, training_dataset
from segcalib.data.transforms import case_to_item, training_transforms, training_volume_transforms
from segcalib.training.patches import patch_batches
from tests.conftest import SMOKE_CONFIG

AUGMENTED = [
    "data.augment.flip_prob=0.5", "data.augment.scale_intensity_prob=0.5",
    "data.augment.shift_intensity_prob=0.5", "data.augment.noise_prob=0.5", "data.positive_fraction=0.5",
    "train.iterations_per_epoch=5",  # 4 training cases x 2 samples = 4 batches: a second loader cycle
]


def _legacy_dataset(cfg, cases) -> CacheDataset:
    """The pipeline before the split: the whole chain in a CacheDataset (copies the cache per sample)."""
    return CacheDataset([case_to_item(c) for c in cases], transform=training_transforms(cfg.data), num_workers=1, progress=False)


def _batches(dataset, cfg, epoch: int, threaded: bool, workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    seed = 1000 + epoch
    return list(patch_batches(dataset, cfg, seed, epoch, workers=workers, threaded=threaded))


@pytest.mark.parametrize("workers", [0, 1])
def test_cached_threaded_pipeline_draws_the_batches_of_the_uncached_one(workers: int) -> None:
    cfg = load_config(SMOKE_CONFIG, AUGMENTED)
    cases = load_manifest(cfg.data.manifest, split_seed=cfg.data.split_seed).labelled("training")
    legacy, new = _legacy_dataset(cfg, cases), training_dataset(cfg.data, cases, device="cpu")
    assert isinstance(new, PatchDataset)
    flipped = 0
    for epoch in (0, 1):  # a second epoch: the first left the cache as it was
        old_batches = _batches(legacy, cfg, epoch, threaded=False, workers=workers)
        new_batches = _batches(new, cfg, epoch, threaded=True, workers=workers)
        assert len(old_batches) == len(new_batches) == 5
        for (old_image, old_label), (image, label) in zip(old_batches, new_batches):
            assert type(image) is torch.Tensor and image.shape == (2, 1, 32, 48, 32) and image.dtype == torch.float32
            assert torch.equal(old_image, image) and torch.equal(old_label, label)
        flipped += sum(not torch.equal(a[0], b[0]) for a, b in zip(old_batches, _batches(new, cfg, epoch + 7, True, 0)))
    assert flipped > 0  # the seed matters: another epoch seed draws other patches


def test_the_cache_is_built_from_this_config_and_equals_the_uncached_chain() -> None:
    """Changing a deterministic step (the patch padding via the patch size, the normalisation)
    changes the cached volumes: nothing is reused from a dataset of another config."""
    cfg = load_config(SMOKE_CONFIG)
    cases = load_manifest(cfg.data.manifest, split_seed=cfg.data.split_seed).labelled("training")[:2]
    plain = training_dataset(cfg.data, cases).volumes
    other_cfg = load_config(SMOKE_CONFIG, ["data.normalize=none", "data.patch_size=[40,56,40]"])
    other = training_dataset(other_cfg.data, cases).volumes
    for index, case in enumerate(cases):
        cached, changed = plain[index], other[index]
        assert tuple(changed["image"].shape[1:]) == (40, 56, 40) != tuple(cached["image"].shape[1:])
        # z-score normalised: mean 0 over the case's voxels; unnormalised: the raw MR intensities
        assert abs(float(cached["image"][cached["image"] != 0].mean())) < 1.0 < float(changed["image"].max())
        item = training_volume_transforms(other_cfg.data)(case_to_item(case))
        assert torch.equal(torch.as_tensor(item["image"]), changed["image"])
        assert torch.equal(torch.as_tensor(item["label"]), changed["label"])


def test_gpu_training_moves_the_volume_before_the_random_transforms() -> None:
    cfg = load_config(SMOKE_CONFIG, ["data.num_workers=3"])
    assert patch_workers(cfg.data, torch.device("cpu")) == 3
    assert patch_workers(cfg.data, torch.device("cuda", 0)) == 0
    cases = load_manifest(cfg.data.manifest, split_seed=cfg.data.split_seed).labelled("training")[:1]
    names = [type(t).__name__ for t in training_dataset(cfg.data, cases, device="cuda").transform.transforms]
    assert names[:2] == ["ToDeviced", "RandCropByPosNegLabeld"]
    assert "ToDeviced" not in [type(t).__name__ for t in training_dataset(cfg.data, cases).transform.transforms]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_patches_on_the_gpu_equal_the_cpu_ones() -> None:
    cfg = load_config(SMOKE_CONFIG, AUGMENTED)
    cases = load_manifest(cfg.data.manifest, split_seed=cfg.data.split_seed).labelled("training")
    cpu = _batches(training_dataset(cfg.data, cases, device="cpu"), cfg, 0, True, 0)
    gpu = _batches(training_dataset(cfg.data, cases, device="cuda"), cfg, 0, True, 0)
    for (cpu_image, cpu_label), (image, label) in zip(cpu, gpu):
        assert image.device.type == "cuda" and label.device.type == "cuda"
        assert torch.equal(cpu_label, label.cpu())
        assert torch.allclose(cpu_image, image.cpu(), atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_training_epoch_takes_its_patches_from_the_device(tmp_path, monkeypatch) -> None:
    from segcalib.runs import RunDir
    from segcalib.training import train
    from segcalib.training import trainer as trainer_module

    seen: list[str] = []
    original = trainer_module.patch_batches

    def spy(*args, **kwargs):
        for image, label in original(*args, **kwargs):
            seen.append(f"{image.device.type}/{label.device.type}")
            yield image, label

    monkeypatch.setattr(trainer_module, "patch_batches", spy)
    cfg = load_config(SMOKE_CONFIG, ["train.epochs=1", "train.device=cuda", "data.num_workers=2"])
    summary = train(cfg, RunDir(tmp_path / "run"), progress=False)
    assert summary.epochs_run == 1 and seen == ["cuda/cuda"] * cfg.train.iterations_per_epoch
