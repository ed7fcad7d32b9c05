"""Numbers refused at the command line: ``--boundary-mm`` inf / NaN / <= 0, ``--bins`` outside
1..10,000 exit 2 with argparse's one-line message, before any file is read."""

from __future__ import annotations

import argparse
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segcalib.cli import main
from segcalib.cli._args import bin_count, bounded, positive_mm
from segcalib.metrics.calibration_functional import MAX_BINS


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_positive_mm_accepts_exactly_finite_positive_numbers(value: float) -> None:
    text = repr(value)
    if math.isfinite(value) and value > 0:
        assert positive_mm(text) == value
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            positive_mm(text)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(10**12), max_value=10**12))
def test_bin_count_accepts_exactly_1_to_max(value: int) -> None:
    if 1 <= value <= MAX_BINS:
        assert bin_count(str(value)) == value
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="outside \\[1, 10000\\]"):
            bin_count(str(value))


def test_bounded_closed_and_open_ends() -> None:
    assert bounded(float, low=0.0)("0") == 0.0
    with pytest.raises(argparse.ArgumentTypeError, match=r"outside \(0, inf\)"):
        bounded(float, low=0.0, low_open=True)("0")
    with pytest.raises(argparse.ArgumentTypeError, match="is not an integer"):
        bin_count("1.5")


@pytest.mark.parametrize(
    "option, value, expect",
    [
        ("--boundary-mm", "inf", "must be a finite number"),
        ("--boundary-mm", "nan", "must be a finite number"),
        ("--boundary-mm", "0", "outside (0, inf)"),
        ("--boundary-mm", "-2", "outside (0, inf)"),
        ("--bins", "100000000", "outside [1, 10000]"),
        ("--bins", "0", "outside [1, 10000]"),
    ],
)
def test_evaluate_refuses_bad_numbers_with_exit_2(capsys, tmp_path, option: str, value: str, expect: str) -> None:
    code = main(["evaluate", "--predictions", str(tmp_path), "--manifest", "m.json", "--output",
                 str(tmp_path / "out"), option, value])
    err = capsys.readouterr().err
    assert code == 2
    assert f"argument {option}: " in err and expect in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
