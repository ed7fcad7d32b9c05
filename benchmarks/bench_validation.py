"""Validation on whole volumes: metrics of case i overlapped with the sliding window of case i+1,
against the sequential loop, on the hippocampus recipe's validation cases.

Both loops run the same network (random weights, seeded) over the same cached volumes, alternating
``--rounds`` times; the benchmark also checks that they give the same numbers.

    python -m benchmarks.bench_validation --rounds 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.bench_training import machine_load

REPO = Path(__file__).resolve().parents[1]


def measure(config: str | Path = REPO / "configs" / "hippocampus" / "base.yaml", rounds: int = 3, cases: int = 16,
            device: str = "auto") -> dict:
    """Median seconds of ``validate`` sequential and overlapped, and whether their numbers agree."""
    from segcalib.config import load_config
    from segcalib.data import load_manifest
    from segcalib.data.datasets import volume_dataset
    from segcalib.inference.sliding_window import SlidingWindow
    from segcalib.models import build_model
    from segcalib.training.trainer import build_loss_for
    from segcalib.training.validation import validate
    from segcalib.utils.devices import select_device

    cfg = load_config(config)
    dev = select_device(device)
    manifest = load_manifest(cfg.data.manifest, split_seed=cfg.data.split_seed)
    chosen = list(manifest.labelled("validation"))[:cases]
    volumes = volume_dataset(cfg.data, chosen)
    torch.manual_seed(0)
    net = build_model(cfg.model.name, spatial_dims=3, in_channels=manifest.num_channels,
                      out_channels=manifest.num_classes, **cfg.model.params).to(dev)
    window = SlidingWindow.from_config(cfg)
    loss_fn = build_loss_for(cfg, manifest.num_classes).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}  # CPU seconds, every thread of this process
    results = {}
    validate(net, volumes, window, loss_fn, manifest.num_classes, dev)  # warm-up
    for _ in range(rounds):
        for overlap in (False, True):
            sync()
            started, cpu_started = time.perf_counter(), time.process_time()
            results[overlap] = validate(net, volumes, window, loss_fn, manifest.num_classes, dev, overlap=overlap)
            sync()
            times[overlap].append(time.perf_counter() - started)
            cpu[overlap].append(time.process_time() - cpu_started)
    same = repr(results[False]) == repr(results[True])  # NaN Dice compares equal in repr
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    median_cpu = {k: sorted(v)[len(v) // 2] for k, v in cpu.items()}
    return {"device": name, "cases": len(chosen), "rounds": rounds, "sequential_s": median[False],
            "overlapped_s": median[True], "ratio": median[True] / median[False], "sequential_cpu_s": median_cpu[False],
            "overlapped_cpu_s": median_cpu[True], "same_numbers": same}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "hippocampus" / "base.yaml"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args(argv)
    print(f"load before: {machine_load()}")
    r = measure(args.config, args.rounds, args.cases, args.device)
    print(f"device: {r['device']}; {r['cases']} validation cases, median of {r['rounds']} alternating rounds")
    print(f"sequential {r['sequential_s']:.2f} s, overlapped {r['overlapped_s']:.2f} s "
          f"({r['ratio']:.2f}x); CPU time {r['sequential_cpu_s']:.2f} s vs {r['overlapped_cpu_s']:.2f} s; "
          f"same numbers: {r['same_numbers']}")
    print(f"load after: {machine_load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
