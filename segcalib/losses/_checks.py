"""Validation of loss constructor parameters: every problem is a ConfigError naming loss and parameter."""

from __future__ import annotations

import math
from typing import Sequence

from segcalib.errors import ConfigError


def _fail(loss: str, name: str, expected: str, value: object) -> ConfigError:
    return ConfigError(f"loss '{loss}': parameter '{name}' must be {expected}, got {value!r}")


def check_float(
    loss: str,
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    """Return ``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(loss, name, "a finite number", value)
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        left = "(" if low_open else "["
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise _fail(loss, name, f"in {left}{lo}, {hi}]", value)
    return value


def check_int(loss: str, name: str, value: object, *, low: int | None = None) -> int:
    """Return ``value`` as an int ``>= low`` (booleans are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(loss, name, "an integer", value)
    if low is not None and value < low:
        raise _fail(loss, name, f"an integer >= {low}", value)
    return int(value)


def check_odd(loss: str, name: str, value: object, *, low: int = 1) -> int:
    """Return ``value`` as an odd int ``>= low`` (a window centred on the voxel)."""
    if isinstance(value, bool) or not isinstance(value, int) or value % 2 == 0 or value < low:
        raise _fail(loss, name, f"an odd integer >= {low}", value)
    return int(value)


def check_bool(loss: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(loss, name, "true or false", value)
    return value


def check_choice(loss: str, name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise _fail(loss, name, "one of " + ", ".join(repr(c) for c in choices), value)
    return str(value)


def set_multiplier_schedule(
    loss: object, name: str, *, penalty: str, lambda_min: float, lambda_max: float, lambda_step: int,
    rho_init: float, rho_max: float, rho_step: int, gamma: float, tau: float, penalties: tuple[str, ...],
) -> None:
    """Check the augmented-Lagrangian schedule shared by CALS and CRaC (SPEC §2) and set it on ``loss``:
    the penalty, multiplier bounds and update period, the penalty parameter's start, cap, growth period
    and factor, and the progress ratio ``tau``. Each bad value is a ConfigError naming its key."""
    loss.penalty = check_choice(name, "penalty", penalty, penalties)
    loss.lambda_min = check_float(name, "lambda_min", lambda_min, low=0.0)
    loss.lambda_max = check_float(name, "lambda_max", lambda_max, low=loss.lambda_min)
    loss.lambda_step = check_int(name, "lambda_step", lambda_step, low=1)
    loss.rho_init = check_float(name, "rho_init", rho_init, low=0.0, low_open=True)
    loss.rho_max = check_float(name, "rho_max", rho_max, low=loss.rho_init)
    loss.rho_step = check_int(name, "rho_step", rho_step, low=0)
    loss.gamma = check_float(name, "gamma", gamma, low=1.0)
    loss.tau = check_float(name, "tau", tau, low=0.0)
