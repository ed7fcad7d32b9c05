"""The benchmark scripts still run (tiny sizes; their timings are not checked here)."""

from __future__ import annotations

from benchmarks import bench_evaluate, bench_export, run_all  # noqa: F401


def test_evaluate_benchmark_runs(capsys) -> None:
    assert bench_evaluate.main(["--size", "32", "--roi", "32", "--repeat", "1", "--skip-monai-metrics"]) == 0
    out = capsys.readouterr().out
    assert "x bare" in out and "ECE all" in out


def test_export_benchmark_measures_memory(capsys) -> None:
    assert bench_export.main(["--sizes", "48"]) == 0
    assert "peak/output" in capsys.readouterr().out
