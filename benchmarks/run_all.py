"""Every benchmark of segcalib, side by side with what users would otherwise use; prints ratios.

    python -m benchmarks.run_all            # CPU numbers on this machine; GPU sections when CUDA is available
    python -m benchmarks.run_all --quick    # smaller sizes, for a smoke check

Results are recorded in docs/benchmarks.md with the machine they ran on.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from benchmarks import (
    bench_calibrators,
    bench_cli_startup,
    bench_ensemble_memory,
    bench_evaluate,
    bench_export,
    bench_losses,
    bench_metrics,
    bench_training,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    args = parser.parse_args(argv)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"# segcalib benchmarks, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"# machine: {platform.machine()}, {torch.get_num_threads()} CPU threads, GPU: {gpu}; "
          f"python {platform.python_version()}, torch {torch.__version__}")
    sections = [
        ("losses (loss alone and a 3D U-Net training step vs CE)", bench_losses.main,
         ["--reps", "5", "--train-reps", "3"] if args.quick else []),
        ("calibration and surface metrics vs torchmetrics / MONAI / scipy", bench_metrics.main,
         ["--sizes", "64"] if args.quick else ["--sizes", "128", "256"]),
        ("evaluation: inference + every metric vs bare MONAI sliding window", bench_evaluate.main,
         ["--size", "64", "--roi", "32", "--repeat", "1"] if args.quick else (["--size", "256"] if torch.cuda.is_available() else ["--size", "128"])),
        ("export host memory", bench_export.main, ["--sizes", "128"] if args.quick else ["--sizes", "256", "512"]),
        ("ensemble export host memory, 1 vs 5 members", bench_ensemble_memory.main,
         ["--size", "128"] if args.quick else []),
        ("post-hoc calibrators vs Fiducio 0.2", bench_calibrators.main,
         ["--cases", "4", "--size", "16", "--test-cases", "2", "--sweep", "2", "4", "--sweep-size", "16",
          "--methods", "temperature", "vector", "auto"] if args.quick else []),
        ("training throughput, 3D hippocampus recipe", bench_training.main, ["--steps", "5"] if args.quick else ["--steps", "30"]),
        ("command-line start-up (--help, --version, usage errors)", bench_cli_startup.main,
         ["--repeat", "2"] if args.quick else []),
    ]
    for title, fn, argv_ in sections:
        print(f"\n## {title}\n", flush=True)
        started = time.time()
        fn(argv_)
        print(f"({time.time() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
