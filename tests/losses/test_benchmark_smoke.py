"""The loss benchmark runs end to end (tiny sizes; timings are not checked here)."""

from __future__ import annotations

from benchmarks.bench_losses import main


def test_benchmark_runs_and_prints_ratios(capsys) -> None:
    assert main(["--device", "cpu", "--size", "16", "--reps", "1", "--train-reps", "1", "--losses", "ce", "mbls", "cals"]) == 0
    out = capsys.readouterr().out
    assert "| F.cross_entropy |" in out and "| mbls |" in out and "| cals |" in out
    assert "Training step" in out and "overhead vs CE" in out
