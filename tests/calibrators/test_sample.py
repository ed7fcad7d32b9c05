"""The stratified voxel sample: shrinking it equals having kept fewer voxels from the start."""

from __future__ import annotations

import torch

from segcalib.calibrators.sample import StratifiedSample


def _fill(sample: StratifiedSample, cases: list[tuple[torch.Tensor, torch.Tensor]]) -> StratifiedSample:
    for z, y in cases:
        sample.add(z, y)
    return sample


def test_shrink_equals_a_smaller_sample_of_the_same_stream() -> None:
    g = torch.Generator().manual_seed(3)
    cases = [(torch.randn(1, 3, 10, 12, 9, generator=g), torch.randint(0, 3, (1, 10, 12, 9), generator=g)) for _ in range(5)]
    big = _fill(StratifiedSample(3, 3000, seed=7), cases)
    small = _fill(StratifiedSample(3, 600, seed=7), cases)
    big.shrink(600)
    for k in range(3):
        assert torch.equal(big.keys[k].sort().values, small.keys[k].sort().values)
        assert torch.equal(big.logits[k][big.keys[k].argsort()], small.logits[k][small.keys[k].argsort()])
    assert torch.equal(big.offered, small.offered) and len(big) == len(small) == 600
    (_, _, w_big), (_, _, w_small) = big.data(), small.data()
    assert torch.equal(w_big.sort().values, w_small.sort().values)  # offered / kept per class
