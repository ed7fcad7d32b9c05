"""The GPU check's plumbing, without a GPU: the summariser on crafted stage results, the JUnit
reading and CUDA-test verdict, the wheel selection, and the conftest hook that marks CUDA tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks import gpu_stages, gpu_summary, gpu_wheels

REPO = Path(__file__).resolve().parents[1]


def _write(folder: Path, name: str, data: dict | str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(data if isinstance(data, str) else json.dumps(data))


def _crafted(work: Path) -> None:
    stages, logs = work / "stages", work / "logs"
    env = {"status": "info", "reason": "NVIDIA H200", "checks": [], "figures": {
        "device": "NVIDIA H200", "capability": "9.0", "device_memory_gib": 139.8, "python": "3.12.3",
        "torch": "2.11.0", "torch_cuda": "13.0", "cudnn": 91000, "cpus": 16,
        "wheels_installed": ["monai-1.6.1-py3-none-any.whl"], "nvidia_smi": "| NVIDIA H200  580.159 |"}}
    _write(stages, "env.json", env)
    _write(stages, "env.meta.json", {"rc": 0, "seconds": 2.5, "timeout_s": 60, "timed_out": False})
    metrics = gpu_stages.result([gpu_stages.check("calibration 256³", 2.4, "ms", 3.0),
                                 gpu_stages.check("HD95 per class", 12.5, "ms", 10.0)], {"size": 256})
    _write(stages, "metrics.json", metrics)
    _write(stages, "metrics.meta.json", {"rc": 0, "seconds": 20.0, "timeout_s": 75, "timed_out": False})
    # losses: the stage wrote nothing because the shell killed it
    _write(stages, "losses.meta.json", {"rc": 124, "seconds": 90.0, "timeout_s": 90, "timed_out": True})
    _write(logs, "losses.log", "warming up\nstill warming up")
    # evaluate: crashed before writing its JSON
    _write(stages, "evaluate.meta.json", {"rc": 1, "seconds": 4.0, "timeout_s": 75, "timed_out": False})
    _write(logs, "evaluate.log", "Traceback ...\nModuleNotFoundError: No module named 'monai'")
    _write(stages, "export.meta.json", {"no_time": True, "reason": "not run: 20 s left of the 480 s budget, needs 40 s",
                                        "seconds": 0, "timeout_s": 0})


def test_summary_of_crafted_results(tmp_path: Path) -> None:
    _crafted(tmp_path / "work")
    results = gpu_summary.summarise(tmp_path / "work", tmp_path / "out", 480, 300)
    by = {s["stage"]: s for s in results["stages"]}
    assert [s["stage"] for s in results["stages"]] == ["env", "metrics", "losses", "evaluate", "export"]
    assert by["metrics"]["status"] == "fail" and by["metrics"]["seconds"] == 20.0
    assert by["losses"]["status"] == "timeout" and "90 s limit" in by["losses"]["reason"]
    assert by["losses"]["log_tail"].endswith("still warming up")
    assert by["evaluate"]["status"] == "error" and "exit code 1" in by["evaluate"]["reason"]
    assert by["export"]["status"] == "not run" and "20 s left" in by["export"]["reason"]
    assert results["overall"] == "fail"
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["overall"] == "fail"

    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "- machine: NVIDIA H200 (compute capability 9.0, 139.8 GiB)" in md
    assert "**Overall: FAIL**" in md
    assert "| metrics | fail | 20.0 | calibration 256³ | 2.4 ms | <= 3 ms | pass |" in md
    assert "| | | | HD95 per class | 12.5 ms | <= 10 ms | **FAIL** |" in md
    assert "| losses | timeout | 90.0 | killed after its 90 s limit | | | |" in md
    assert "| NVIDIA H200  580.159 |" in md and "installed from wheels: monai-1.6.1-py3-none-any.whl" in md
    assert "## evaluate: end of its log\n\n```\nTraceback ...\nModuleNotFoundError: No module named 'monai'\n```" in md
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "===== evaluate =====\nTraceback" in log


def test_overall_verdicts() -> None:
    def stages(*statuses: str) -> list[dict]:
        return [{"stage": "env", "status": "info"}] + [{"stage": f"s{i}", "status": s} for i, s in enumerate(statuses)]

    assert gpu_summary.overall(stages("pass", "pass")) == "pass"
    assert gpu_summary.overall(stages("skipped", "skipped")) == "not run (no CUDA)"
    assert gpu_summary.overall(stages("pass", "skipped")) == "incomplete"
    assert gpu_summary.overall(stages("pass", "not run")) == "incomplete"
    assert gpu_summary.overall(stages("pass", "incomplete", "timeout")) == "fail"


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="" name="tests.export.test_export"><error message="collection failure">ImportError while
importing test module
E   ModuleNotFoundError: No module named 'SimpleITK'</error></testcase>
<testcase classname="" name="tests.data.test_new"><error message="collection failure">
E   ModuleNotFoundError: No module named 'monai.transforms'</error></testcase>
<testcase classname="tests.metrics.test_surface" name="test_cuda_equals_cpu"/>
<testcase classname="tests.losses.test_all_losses" name="test_cuda_matches_cpu[ce]"/>
<testcase classname="tests.losses.test_all_losses" name="test_cuda_matches_cpu[mbls]"><failure message="assert">x</failure></testcase>
<testcase classname="tests.spatial.test_distance" name="test_cupy"><skipped message="needs CUDA and CuPy">s</skipped></testcase>
</testsuite></testsuites>"""


def test_junit_and_cuda_test_verdict(tmp_path: Path) -> None:
    (tmp_path / "j.xml").write_text(JUNIT)
    figures = gpu_stages.parse_junit(tmp_path / "j.xml")
    assert figures == {
        "passed": 2, "failed": ["tests.losses.test_all_losses::test_cuda_matches_cpu[mbls]"], "errors": [],
        "skipped": {"needs CUDA and CuPy": 1},
        "not_collected": {"tests.export.test_export": "SimpleITK", "tests.data.test_new": "monai.transforms"},
    }
    # on a GPU: one failure plus one module that could not import a carried package = 2
    verdict = gpu_stages.cuda_tests_verdict(figures, cuda=True, rc=1)
    assert verdict["status"] == "fail" and verdict["checks"][0]["value"] == 2
    # only a missing SimpleITK (not carried) and a CuPy skip: every test ran but one, so incomplete
    clean = dict(figures, failed=[], not_collected={"tests.export.test_export": "SimpleITK"})
    assert gpu_stages.cuda_tests_verdict(clean, cuda=True, rc=0)["status"] == "incomplete"
    assert gpu_stages.cuda_tests_verdict(dict(clean, skipped={}), cuda=True, rc=0)["status"] == "pass"
    no_gpu = gpu_stages.cuda_tests_verdict(figures, cuda=False, rc=0)
    assert no_gpu["status"] == "skipped" and "4 CUDA tests selected, 1 skipped" in no_gpu["reason"]
    assert gpu_stages.cuda_tests_verdict({"passed": 0}, cuda=True, rc=5)["status"] == "error"
    assert gpu_stages.cuda_tests_verdict({}, cuda=True, rc=None)["status"] == "timeout"


def test_wheel_selection(tmp_path: Path) -> None:
    for name in ("pytest-1.0-py3-none-any.whl", "pytest-999.0-py3-none-any.whl", "no_such_pkg_xyz-1.0-py3-none-any.whl",
                 "typing_extensions-1.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    chosen = {w.name: why for w, why in gpu_wheels.needed(list(tmp_path.glob("*.whl")))}
    assert gpu_wheels.wheel_name_version(tmp_path / "typing_extensions-1.0-py3-none-any.whl") == ("typing-extensions", "1.0")
    assert set(chosen) == {"pytest-999.0-py3-none-any.whl", "no_such_pkg_xyz-1.0-py3-none-any.whl"}
    assert chosen["no_such_pkg_xyz-1.0-py3-none-any.whl"] == "missing" and " < 999.0" in chosen["pytest-999.0-py3-none-any.whl"]


CRAFTED_TESTS = """
import pytest

@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_reason_cuda(): pass

@pytest.mark.skipif(False, reason="needs a GPU")
def test_reason_gpu(): pass

@pytest.mark.skipif("not torch.cuda.is_available()")
def test_string_condition(): pass

@pytest.mark.skipif(True, reason="needs SimpleITK")
def test_other_skip(): pass

def test_plain(): pass

@pytest.mark.cuda
def test_marked_by_hand(): pass

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(True, reason="no CUDA"))])
def test_param(device): pass
"""


def test_conftest_marks_every_cuda_skipif(tmp_path: Path) -> None:
    """`-m cuda` selects exactly the tests whose skipif mentions CUDA or a GPU, however written
    (a subprocess that loads tests/conftest.py as a plugin on a crafted file)."""
    (tmp_path / "test_crafted.py").write_text(CRAFTED_TESTS)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "--rootdir", str(tmp_path), "-m", "cuda", str(tmp_path / "test_crafted.py")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    selected = sorted(line.split("::")[-1] for line in out.stdout.splitlines() if "::" in line)
    assert selected == ["test_marked_by_hand", "test_param[cuda]", "test_reason_cuda", "test_reason_gpu",
                        "test_string_condition"], out.stdout + out.stderr
