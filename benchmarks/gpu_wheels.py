"""Which carried wheels this Python lacks: those not installed, or installed at an older version.

    python -m benchmarks.gpu_wheels WHEELS_DIR    # prints the wheel paths to install, one a line

Used by ``benchmarks/gpu_check.sh`` before it installs them with ``pip --no-index --no-deps
--target``; a wheel whose package is already there at the same or a newer version is left out,
so the machine's own builds (numpy, torch, ...) are never shadowed. Standard library only.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path


def wheel_name_version(path: Path) -> tuple[str, str]:
    """``(normalised name, version)`` from a wheel's file name (PEP 427)."""
    name, version = path.name.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def _older(installed: str, wanted: str) -> bool:
    try:
        from packaging.version import Version

        return Version(installed) < Version(wanted)
    except Exception:  # no packaging, or a version it cannot parse: compare the numbers
        def key(v: str) -> list[int]:
            return [int(x) for x in re.findall(r"\d+", v)]

        return key(installed) < key(wanted)


def needed(wheels: list[Path]) -> list[tuple[Path, str]]:
    """``(wheel, why)`` for each wheel whose package is missing or older here."""
    out = []
    for wheel in sorted(wheels):
        name, version = wheel_name_version(wheel)
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            out.append((wheel, "missing"))
            continue
        if _older(have, version):
            out.append((wheel, f"{have} < {version}"))
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m benchmarks.gpu_wheels WHEELS_DIR", file=sys.stderr)
        return 2
    wheels = list(Path(args[0]).glob("*.whl"))
    chosen = needed(wheels)
    for wheel, why in chosen:
        print(f"  install {wheel.name} ({why})", file=sys.stderr)
    print(f"  {len(wheels) - len(chosen)} of {len(wheels)} wheels already satisfied here", file=sys.stderr)
    for wheel, _ in chosen:
        print(wheel)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
