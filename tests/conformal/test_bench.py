"""The conformal benchmark runs at tiny sizes, and its memory is flat in the cases."""

from __future__ import annotations

from benchmarks import bench_conformal


def test_conformal_benchmark_runs_and_memory_is_flat(capsys) -> None:
    assert bench_conformal.main(["--size", "24", "--cases", "1", "4", "--risks", "fnr", "--synthetic-cases", "60",
                                 "--splits", "50", "--n-cal", "30"]) == 0
    out = capsys.readouterr().out
    assert "(flat," in out and "GROWS" not in out
    assert "class1      fnr" in out and "FAIL" not in out
