"""Temperature scaling: recovers a known temperature; the voxel sample is uniform and bounded."""

from __future__ import annotations

import pytest
import torch

from segcalib.inference.temperature import VoxelSample, apply_temperature, apply_temperature_, fit_temperature


def test_recovers_a_known_temperature() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(400_000, 4, generator=g) * 3.0
    true_t = 2.5
    targets = torch.multinomial(torch.softmax(logits / true_t, dim=1), 1, generator=g)[:, 0]
    assert fit_temperature(logits, targets) == pytest.approx(true_t, abs=0.05)


def test_fitted_temperature_minimises_nll() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(20_000, 3, generator=g) * 4
    targets = torch.multinomial(torch.softmax(logits / 1.7, 1), 1, generator=g)[:, 0]
    t = fit_temperature(logits, targets)
    nll = lambda s: torch.nn.functional.cross_entropy(logits.double() / s, targets).item()  # noqa: E731
    assert nll(t) <= min(nll(t * 0.98), nll(t * 1.02))


def test_apply_temperature() -> None:
    z = torch.tensor([[[2.0]], [[0.0]]]).unsqueeze(0)  # (1, 2, 1, 1)
    p = apply_temperature(z, 2.0)
    assert p[0, 0, 0, 0].item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())
    assert z[0, 0, 0, 0].item() == 2.0  # the out-of-place form leaves its input alone


def test_in_place_temperature_on_large_logits_matches_float64_softmax() -> None:
    z = torch.randn(3, 5, 4, 6) * 40  # exp overflows without the max shift
    reference = torch.softmax(z.double() / 0.7, dim=0)
    out = apply_temperature_(z, 0.7, dim=0)
    assert out.data_ptr() == z.data_ptr()
    torch.testing.assert_close(out.double(), reference, atol=1e-6, rtol=1e-5)


def test_voxel_sample_is_bounded_seeded_and_masked() -> None:
    def fill(seed: int) -> VoxelSample:
        sample = VoxelSample(max_voxels=1000, seed=seed)
        for case in range(5):
            logits = torch.full((1, 2, 20, 20, 5), float(case))
            target = torch.ones(1, 20, 20, 5, dtype=torch.long)
            mask = torch.zeros(1, 20, 20, 5, dtype=torch.bool)
            mask[..., :3] = True  # 1200 voxels offered per case
            sample.add(logits, target, mask)
        return sample

    a, b, c = fill(0), fill(0), fill(1)
    assert len(a) == 1000 and a.offered == 6000
    assert torch.equal(a.logits, b.logits) and not torch.equal(a.keys, c.keys)
    # uniform over the cases offered: each case holds about 1/5 of the sample
    counts = torch.bincount(a.logits[:, 0].long(), minlength=5).float()
    assert ((counts - 200).abs() < 60).all()
    assert fill(0).targets.eq(1).all()


def test_uninformative_predictions_keep_a_bounded_temperature() -> None:
    from segcalib.inference.temperature import T_BOUNDS

    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0]]).repeat(100, 1)
    targets = torch.tensor([1, 1, 0]).repeat(100)  # always wrong: NLL falls as T grows without bound
    assert fit_temperature(logits, targets) == T_BOUNDS[1]
