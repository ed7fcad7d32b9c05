"""Issue 21, item 5: ``segcalib --help``, ``--version`` and usage errors build no other command's
options, and ``export``, ``data``, ``train`` and ``report`` build theirs without a registry, so they
import neither torch nor MONAI (the time is measured by benchmarks/bench_cli_startup.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "monai", "nibabel", "scipy", "numpy")
PROBE = """
import json, sys
from segcalib.cli import main
try:
    code = main({args!r})
except SystemExit as exc:
    code = exc.code
heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r}))
print(json.dumps({{"code": code, "heavy": heavy}}))
"""


def _probe(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(args=args, heavy=HEAVY)], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("args, code", [(["--help"], 0), (["--version"], 0), (["bogus"], 2), ([], 2),
                                        (["--debug", "nope"], 2), (["export"], 2), (["data", "check"], 2),
                                        (["train", "--bogus"], 2), (["report"], 2), (["evaluate"], 2),
                                        (["calibrate", "fit", "--predictions", "x"], 2), (["calibrate"], 2),
                                        (["conformal", "fit", "--predictions", "x"], 2), (["nnunet"], 2)])
def test_top_level_answers_import_nothing_heavy(args: list[str], code: int) -> None:
    result = _probe(args)
    assert result == {"code": code, "heavy": []}


def test_a_command_still_gets_its_full_options(capsys) -> None:
    from segcalib.cli import build_parser

    parser = build_parser(["calibrate", "fit"])
    args = parser.parse_args(["calibrate", "fit", "--predictions", "p", "--manifest", "m", "--output", "o",
                              "--method", "vector"])
    assert args.method == "vector" and args.func.__name__ == "run_fit"
    full = build_parser()  # without argv: every command complete (documentation, tests)
    assert full.parse_args(["export", "--run", "r", "--manifest", "m", "--output", "o"]).command == "export"


def test_a_mistyped_command_or_choice_gets_a_suggestion(capsys) -> None:
    from segcalib.cli import main

    assert main(["exprot"]) == 2
    assert "invalid choice: 'exprot'; did you mean 'export'?" in capsys.readouterr().err
    fit = ["calibrate", "fit", "--predictions", "p", "--manifest", "m", "--output", "o"]
    assert main([*fit, "--method", "vectr"]) == 2
    assert "invalid choice: 'vectr'; did you mean 'vector'?" in capsys.readouterr().err
    assert _probe(["exprot"]) == {"code": 2, "heavy": []}


@pytest.mark.parametrize("args", [["calibrate", "fit", "--help"], ["evaluate", "--help"], ["conformal", "fit", "--help"]])
def test_a_registry_command_help_does_not_import_monai(args: list[str]) -> None:
    # its choices come from the registries (torch), but the sliding window's MONAI is seconds more
    result = _probe(args)
    assert result["code"] == 0 and "torch" in result["heavy"] and "monai" not in result["heavy"]
