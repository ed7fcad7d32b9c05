"""How long ``segcalib`` takes to answer ``--help``, ``--version`` and a usage error (issue 21: <= 1 s
on 2 cores), each in a fresh process, as a user's shell runs it; the commands whose options list a
registry's names (``evaluate``, ``calibrate``) and ``--help`` texts that list them, for comparison.

    python -m benchmarks.bench_cli_startup            # median of 5 runs each
    python -m benchmarks.bench_cli_startup --repeat 2
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = [
    ("--help", ["--help"], 1.0),
    ("--version", ["--version"], 1.0),
    ("usage error: unknown command", ["bogus"], 1.0),
    ("usage error: no command", [], 1.0),
    ("export usage error", ["export"], 1.0),
    ("data check usage error", ["data", "check"], 1.0),
    ("export --help (lists the regions: imports them)", ["export", "--help"], None),
    ("evaluate usage error (imports the metric registry)", ["evaluate"], None),
    ("calibrate fit usage error (imports the calibrators)", ["calibrate", "fit"], None),
    ("calibrate fit --help (imports torch, not MONAI)", ["calibrate", "fit", "--help"], None),
    ("evaluate --help (lists the metrics)", ["evaluate", "--help"], None),
]


def measure(args: list[str], repeat: int) -> float:
    """Median wall-clock seconds of ``python -m segcalib ARGS`` over ``repeat`` fresh processes."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "segcalib", *args], capture_output=True, check=False)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"{'what':<54} {'median s':>9}  target")
    for title, cli_args, target in CASES:
        seconds = measure(cli_args, args.repeat)
        verdict = "" if target is None else ("<= 1 s: ok" if seconds <= target else "<= 1 s: MISSED")
        print(f"{title:<54} {seconds:>9.2f}  {verdict}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
