"""The loss benchmark runs end to end (tiny sizes; timings are not checked here)."""

from __future__ import annotations

from benchmarks.bench_losses import main


def test_benchmark_runs_and_prints_ratios(capsys) -> None:
    argv = ["--device", "cpu", "--size", "16", "--reps", "1", "--train-reps", "1", "--losses", "ce", "mbls", "softl1ace",
            "--train-losses", "ce", "softl1ace_ce", "crac", "--memory-size", "16", "--memory-losses", "softl1ace"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| F.cross_entropy |" in out and "| mbls |" in out and "| softl1ace |" in out
    assert "Training step" in out and "overhead vs CE" in out and "| softl1ace_ce |" in out and "| crac |" in out
    assert "Peak memory" in out and "machine load before:" in out
