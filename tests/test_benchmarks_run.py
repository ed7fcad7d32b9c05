"""The benchmark scripts still run (tiny sizes; their timings are not checked here)."""

from __future__ import annotations

import pytest

from benchmarks import bench_evaluate, bench_export, run_all


def test_evaluate_benchmark_runs(capsys) -> None:
    assert bench_evaluate.main(["--size", "32", "--roi", "32", "--repeat", "1", "--skip-monai-metrics"]) == 0
    out = capsys.readouterr().out
    assert "x bare" in out and "ECE all" in out


def test_export_benchmark_measures_memory(capsys) -> None:
    assert bench_export.main(["--sizes", "48"]) == 0
    assert "peak/output" in capsys.readouterr().out


def test_run_all_imports_every_benchmark_and_lists_its_options(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_all.main(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out
