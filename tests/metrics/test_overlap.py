"""Dice per class against NumPy, NaN for classes absent from both, streaming counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcalib.metrics import dice, dice_counts, dice_from_counts
from tests.metrics._reference import ref_dice


def test_dice_matches_reference_batched_and_single() -> None:
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, (3, 9, 8, 7))
    gt = rng.integers(0, 3, (3, 9, 8, 7))  # class 3 is never in the ground truth
    gt[1] = 0
    pred[1] = 0  # case 1: only background in both -> classes 1..3 NaN
    got = dice(torch.from_numpy(pred), torch.from_numpy(gt), 4)
    assert got.shape == (3, 4) and got.dtype == torch.float64
    expected = np.stack([ref_dice(pred[b], gt[b], 4) for b in range(3)])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-15, equal_nan=True)
    assert torch.isnan(got[1, 1:]).all() and got[1, 0] == 1.0
    assert got[0, 3] == 0.0  # predicted but absent from the ground truth
    single = dice(torch.from_numpy(pred[0]), torch.from_numpy(gt[0]), 4, batched=False)
    np.testing.assert_allclose(single.numpy(), expected[0], equal_nan=True)


def test_streamed_counts_equal_one_pass() -> None:
    rng = np.random.default_rng(1)
    pred = torch.from_numpy(rng.integers(0, 3, (4, 10, 10)))
    gt = torch.from_numpy(rng.integers(0, 3, (4, 10, 10)))
    total = dice_counts(pred[:1], gt[:1], 3).sum(0) + dice_counts(pred[1:], gt[1:], 3).sum(0)
    pooled = dice(pred.reshape(-1), gt.reshape(-1), 3, batched=False)
    torch.testing.assert_close(dice_from_counts(total), pooled)


def test_dice_rejects_bad_labels_and_shapes() -> None:
    with pytest.raises(ValueError):
        dice(torch.tensor([[0, 5]]), torch.tensor([[0, 1]]), 3)
    with pytest.raises(ValueError):
        dice(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), 3)


def test_dice_contract_probabilities_and_ambiguity() -> None:
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 3, (2, 6, 5, 4))
    probs = torch.from_numpy(rng.random((2, 3, 6, 5, 4)))
    pred = probs.argmax(1).numpy()
    expected = np.stack([ref_dice(pred[b], gt[b], 3) for b in range(2)])
    from_probs = dice(probs, torch.from_numpy(gt).unsqueeze(1), 3)
    np.testing.assert_allclose(from_probs.numpy(), expected, equal_nan=True)
    fg = dice(probs, torch.from_numpy(gt), 3, include_background=False)
    np.testing.assert_allclose(fg.numpy(), expected[:, 1:], equal_nan=True)
    volume = torch.from_numpy(gt[0])  # (D, H, W): a volume or a batch of slices? refused
    with pytest.raises(ValueError, match="spatial_dims"):
        dice(volume, volume, 3)
    as_volume = dice(volume.unsqueeze(0), volume.unsqueeze(0), 3)
    torch.testing.assert_close(dice(volume, volume, 3, spatial_dims=2), dice(volume, volume, 3, batched=True))
    assert as_volume.shape == (1, 3) and dice(volume, volume, 3, spatial_dims=2).shape == (6, 3)
    with pytest.raises(ValueError):
        dice(volume, volume, 3, spatial_dims=3)
