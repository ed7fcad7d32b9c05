"""``conformal.json``: the chosen parameter of every target, its guarantee in one sentence, and
the empirical curves it was chosen from; read back (and checked) by ``conformal apply``.

A target whose calibration cases are too few for a non-trivial bound is refused with one
message (the guarantee would be the trivial mask: the whole image for the miss rates, the empty
mask for the inner fdr); so is a target absent from every calibration case.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segcalib.conformal.control import crc_bound, crc_index, crc_min_cases, fixed_sequence, hb_p_values, ltt_min_cases
from segcalib.conformal.grids import threshold_grid
from segcalib.conformal.statistics import RiskSums
from segcalib.conformal.targets import UNION
from segcalib.errors import DataError
from segcalib.utils.files import write_text_atomic

if TYPE_CHECKING:
    from segcalib.conformal.fit import ConformalOptions, ConformalStatistics

CONFORMAL_JSON = "conformal.json"
FORMAT = "segcalib-conformal/1"


def _sig(values: np.ndarray, digits: int = 6) -> list[float | None]:
    return [None if not math.isfinite(v) else float(f"{v:.{digits}g}") for v in np.asarray(values, dtype=np.float64)]


def _what(name: str) -> str:
    return "the foreground (all classes together)" if name == UNION else f"class {name}"


def _too_few(name: str, sums: RiskSums, needed: int, how: str, trivial: str, levels: str) -> DataError:
    return DataError(
        f"{_what(name)}: {sums.n} calibration case(s) contain it ({len(sums.absent)} without it), {how} needs at "
        f"least {needed} for a non-trivial bound; with fewer the guarantee is only the trivial {trivial}. "
        f"Calibrate on more cases or raise {levels}"
    )


def _crc_target(name: str, sums: RiskSums, risk: str, alpha: float, grid: np.ndarray) -> dict[str, Any]:
    needed = crc_min_cases(alpha)
    if sums.n < max(needed, 1):
        raise _too_few(name, sums, max(needed, 1), f"conformal risk control at alpha {alpha:g}", "full mask (the whole image)",
                       "--alpha")
    mean = sums.mean_loss()
    j = crc_index(mean, sums.n, alpha)
    assert j is not None  # the last grid point has loss 0 and n >= 1/alpha - 1
    out: dict[str, Any] = {"index": j, "lambda": None, "trivial": j == len(grid) - 1,
                           "empirical_risk": float(mean[j]), "bound": float(crc_bound(mean, sums.n)[j]),
                           "mean_relative_size": float(sums.mean_size()[j])}
    if risk == "margin":
        out["margin_mm"] = float(grid[j]) if math.isfinite(grid[j]) else None
        out["lambda"] = out["margin_mm"]
    else:
        out["threshold"] = float(grid[j])
        out["lambda"] = 1.0 - float(grid[j])
    return out


def _ltt_target(name: str, sums: RiskSums, alpha: float, delta: float, grid: np.ndarray) -> dict[str, Any]:
    needed = ltt_min_cases(alpha, delta)
    if sums.n < needed:
        raise _too_few(name, sums, needed, f"Learn-then-Test at alpha {alpha:g}, delta {delta:g}", "empty mask",
                       "--alpha / --inner-alpha or --delta")
    mean = sums.mean_loss()
    p_values = hb_p_values(mean, sums.n, alpha)
    j = fixed_sequence(p_values, delta)
    if j is None:
        return {"index": None, "threshold": None, "lambda": None, "trivial": True, "empirical_risk": None,
                "p_value": float(p_values[0]), "mean_relative_size": 0.0}
    return {"index": j, "threshold": float(grid[j]), "lambda": 1.0 - float(grid[j]), "trivial": False,
            "empirical_risk": float(mean[j]), "p_value": float(p_values[j]),
            "mean_relative_size": float(sums.mean_size()[j])}


def guarantee(name: str, risk: str, chosen: dict[str, Any], n: int, alpha: float, delta: float | None) -> str:
    """The guarantee of one target in one sentence."""
    who = f"a new case exchangeable with the {n} calibration cases that contain {_what(name)}"
    if risk == "fdr":
        if chosen["threshold"] is None:
            return f"Too little evidence at delta {delta:g}: only the empty mask is certified for {_what(name)}."
        mask = f"the mask p >= {chosen['threshold']:.6g}"
        return (f"With probability at least {1 - delta:g} over the calibration cases, for {who}, {mask} has an "
                f"expected false discovery rate (1 - precision, averaged over such cases) of at most {alpha:g}.")
    if risk == "margin":
        r = chosen["margin_mm"]
        mask = ("the whole image" if r is None else "the argmax mask itself" if r == 0 else
                f"the argmax mask {'dilated' if r > 0 else 'eroded'} by {abs(r):g} mm")
    else:
        mask = f"the mask p >= {chosen['threshold']:.6g}"
    return (f"For {who}, {mask} misses on average at most a fraction {alpha:g} of its true voxels (expected "
            "1 - recall over calibration sets and new cases; marginal, not a bound for each case).")


def build_record(stats: ConformalStatistics, options: ConformalOptions, class_names: list[str]) -> dict[str, Any]:
    grid = stats.radii if options.risk == "margin" else stats.thresholds
    method = "ltt" if options.risk == "fdr" else "crc"
    rows, curves = [], {}
    for name, sums in stats.main.items():
        if method == "crc":
            chosen = _crc_target(name, sums, options.risk, options.alpha, grid)
        else:
            chosen = _ltt_target(name, sums, options.alpha, options.delta, grid)
        row = {"name": name, "class": None if name == UNION else class_names.index(name), "n": sums.n,
               "absent": list(sums.absent), **chosen,
               "guarantee": guarantee(name, options.risk, chosen, sums.n, options.alpha,
                                      options.delta if method == "ltt" else None)}
        curves[name] = {"risk": _sig(sums.mean_loss()), "relative_size": _sig(sums.mean_size())}
        if stats.inner is not None:
            inner = _ltt_target(name, stats.inner[name], options.inner_alpha, options.delta, stats.thresholds)
            inner["guarantee"] = guarantee(name, "fdr", inner, stats.inner[name].n, options.inner_alpha, options.delta)
            row["inner"] = inner
            curves[name]["inner_risk"] = _sig(stats.inner[name].mean_loss())
        rows.append(row)
    return {
        "format": FORMAT,
        "risk": options.risk,
        "method": method,
        "alpha": options.alpha,
        "delta": options.delta if method == "ltt" or stats.inner is not None else None,
        "inner_alpha": options.inner_alpha,
        "bound_B": 1.0,
        "absent_convention": "a case without the target's class is left out of that target's risk and listed "
                             "under 'absent'; the guarantee holds for new cases that contain the class",
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "channels": [row["name"] for row in rows],
        "targets": rows,
        "grid": {"kind": "margin_mm" if options.risk == "margin" else "threshold", "size": len(grid),
                 "margin_step_mm": options.margin_step_mm, "margin_max_mm": options.margin_max_mm,
                 "values": _sig(grid, 9) if options.risk == "margin" else "segcalib.conformal.grids.threshold_grid"},
        "curves": curves,
    }


def write_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=1))


def read_record(folder: str | Path) -> dict[str, Any]:
    """The ``conformal.json`` of ``folder``, checked; a DataError naming the file otherwise."""
    path = Path(folder) / CONFORMAL_JSON
    if not path.is_file():
        raise DataError(f"{path}: no conformal record (run segcalib conformal fit --output {folder})")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable conformal record ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise DataError(f"{path}: not a segcalib conformal record (expected format {FORMAT})")
    try:
        names, rows = record["class_names"], record["targets"]
        for row in rows:
            key = "margin_mm" if record["risk"] == "margin" else "threshold"
            value = row[key]
            if value is not None and not isinstance(value, (int, float)):
                raise TypeError(f"{row['name']}: {key} {value!r}")
        if not isinstance(names, list) or len(names) != int(record["num_classes"]):
            raise TypeError("class_names")
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: incomplete conformal record ({exc})") from None
    return record


def threshold_values() -> np.ndarray:
    """The threshold grid the record's indices refer to (for tests and reports)."""
    return threshold_grid()
