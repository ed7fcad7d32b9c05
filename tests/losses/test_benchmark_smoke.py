"""The loss benchmark runs end to end (tiny sizes; timings are not checked here)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_losses import main
from benchmarks.l1ace_baseline import loop_l1ace
from segcalib.losses import build_loss


def test_benchmark_runs_and_prints_ratios(capsys) -> None:
    argv = ["--device", "cpu", "--size", "16", "--reps", "1", "--train-reps", "1", "--losses", "ce", "mbls", "softl1ace",
            "--train-losses", "ce", "softl1ace_ce", "crac", "--memory-size", "16", "--memory-losses", "softl1ace"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| F.cross_entropy |" in out and "| mbls |" in out and "| softl1ace |" in out
    assert "Training step" in out and "overhead vs CE" in out and "| softl1ace_ce |" in out and "| crac |" in out
    assert "Peak memory" in out and "machine load before:" in out
    assert "| softl1ace, reference code's plan (value differs by" in out


@pytest.mark.parametrize("name", ["hardl1ace", "softl1ace"])
def test_the_reference_plan_baseline_computes_the_same_loss(name) -> None:
    """The benchmark's baseline (per-class bucketize + scatter_add in float32, as the reference
    code) and segcalib's loss agree to float32 rounding, values and gradients, on 3D and 2D inputs
    with an absent class, so the timing compares the same quantity."""
    gen = torch.Generator().manual_seed(3)
    for shape in [(2, 4, 12, 10, 8), (2, 3, 20, 16)]:
        logits = (torch.randn(shape, generator=gen) * 3).requires_grad_(True)
        target = torch.randint(0, shape[1], (shape[0],) + shape[2:], generator=gen)
        target[1][target[1] == 2] = 1  # class 2 absent from image 1
        want = loop_l1ace(logits, target, soft=name == "softl1ace")
        got = build_loss(name)(logits, target)
        (want_grad,) = torch.autograd.grad(want, logits)
        (got_grad,) = torch.autograd.grad(got, logits)
        assert abs(want.item() - got.item()) < 1e-6
        assert float((want_grad - got_grad).abs().max()) < 1e-6
