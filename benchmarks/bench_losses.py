"""Cost of the segcalib losses: each loss alone against cross-entropy, a full 3D U-Net step, and memory.

    python -m benchmarks.bench_losses            # CPU (2 threads, 64^3), and GPU too when CUDA is available
    python -m benchmarks.bench_losses --device cuda --size 96

Part 1 times forward + backward of ``F.cross_entropy`` and of every registered loss on the same
``(2, C, S, S, S)`` float32 logits; hard / soft L1-ACE also as their reference code computes them
(one-hot labels, a loop over images and classes of ``bucketize`` + ``scatter_add``:
``benchmarks/l1ace_baseline.py``), side by side. Part 2 times a training step (forward, loss, backward, Adam) of
MONAI's ``UNet(spatial_dims=3, channels=(32, 64, 128, 256), strides=(2, 2, 2))`` on a
``2 x 1 x S^3`` batch with CE, CE + L1-ACE (the reference bundles' combinations), MbLS, CALS and
CRaC; on the GPU under bf16 autocast. Repetitions are interleaved across losses (on CPU each timed
call right after an untimed one of the same loss, so that no loss pays for the previous one's
memory); the tables give
the median time and the median over repetitions of the ratio to CE taken within the same round,
which a busy shared machine disturbs much less than a ratio of medians. GPU timings are
CUDA-synchronised. Part 3 (CPU) measures the peak resident memory of one forward + backward at
``1 x C x M^3`` (M = 128) above the inputs, each loss in a fresh process (VmHWM, reset with
/proc/self/clear_refs), beside the size of one ``(N, C, bins)`` float32 tensor. The machine load
(``uptime``) is printed before and after. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.l1ace_baseline import loop_l1ace
from segcalib.losses import REQUIRED, build_loss, list_losses, loss_parameters

TRAIN_LOSSES = (
    "ce", "hardl1ace_ce", "softl1ace_ce", "ce_dice", "hardl1ace_dice_ce", "softl1ace_dice_ce", "mbls", "cals", "crac",
)  # fmt: skip
MEMORY_LOSSES = ("F.cross_entropy", "hardl1ace", "softl1ace")
BASELINES = {  # what users of the losses' reference code run (benchmarks/l1ace_baseline.py)
    "hardl1ace": ("hardl1ace, reference code's plan", functools.partial(loop_l1ace, soft=False)),
    "softl1ace": ("softl1ace, reference code's plan", functools.partial(loop_l1ace, soft=True)),
}


@dataclass
class Settings:
    device: torch.device
    size: int
    classes: int
    reps: int
    train_reps: int
    autocast: bool
    cpu_clock: bool = False  # process CPU time instead of wall time (CPU only)


def make_loss(name: str, classes: int) -> nn.Module:
    params = {"num_classes": classes} if loss_parameters(name).get("num_classes") is REQUIRED else {}
    return build_loss(name, **params)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved_times(
    fns: dict[str, Callable[[], None]], reps: int, device: torch.device, cpu_clock: bool = False
) -> dict[str, list[float]]:
    """Seconds per call of each function in each of ``reps`` rounds (after one warm-up call each).

    On CPU each timed call comes right after an untimed one of the same function: the previous
    function's frees and page faults otherwise land on the next (`F.cross_entropy` took 4.4–4.8 ms
    warm but 4.7–10.5 ms right after an L1-ACE loss). ``cpu_clock``: this process's CPU seconds,
    which time spent descheduled does not inflate."""
    clock = time.process_time if cpu_clock else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            if device.type == "cpu":  # CUDA's caching allocator keeps no such state between calls
                fn()  # untimed: the allocator and caches in this function's own state, not the previous one's
            _sync(device)
            start = clock()
            fn()
            _sync(device)
            times[name].append(clock() - start)
    return times


def _median_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    return statistics.median(t / b for t, b in zip(times[name], times[baseline]))


@contextlib.contextmanager
def _peak_memory(device: torch.device) -> Iterator[list[float]]:
    """Yields a list that receives the peak extra GPU memory (MiB) of the block; empty on CPU."""
    out: list[float] = []
    if device.type != "cuda":
        yield out
        return
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield out
    torch.cuda.synchronize(device)
    out.append((torch.cuda.max_memory_allocated(device) - base) / 2**20)


def bench_losses_alone(s: Settings, names: Sequence[str]) -> list[tuple[str, float, float, float | None]]:
    """(name, ms, ratio to CE, peak extra MiB or None) for forward + backward of each loss alone; the
    L1-ACE losses also computed as their reference code does (``BASELINES``), side by side."""
    gen = torch.Generator().manual_seed(0)
    shape = (2, s.classes) + (s.size,) * 3
    logits = (torch.randn(shape, generator=gen) * 3).to(s.device).requires_grad_(True)
    target = torch.randint(0, s.classes, (2,) + (s.size,) * 3, generator=gen).to(s.device)
    losses: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"F.cross_entropy": F.cross_entropy}
    for name in names:
        losses[name] = make_loss(name, s.classes).to(s.device)
        if name in BASELINES:
            label, baseline = BASELINES[name]
            with torch.no_grad():
                gap = float((baseline(logits, target) - losses[name](logits, target)).abs())
            losses[f"{label} (value differs by {gap:.1e})"] = baseline

    def step(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            loss_fn(logits, target).backward()
            logits.grad = None

        return run

    times = _interleaved_times({name: step(fn) for name, fn in losses.items()}, s.reps, s.device, s.cpu_clock)
    rows = []
    for name, fn in losses.items():
        with _peak_memory(s.device) as peak:
            step(fn)()
        ratio = _median_ratio(times, name, "F.cross_entropy")
        rows.append((name, statistics.median(times[name]) * 1e3, ratio, peak[0] if peak else None))
    return rows


def bench_training_step(s: Settings, names: Sequence[str]) -> list[tuple[str, float, float]]:
    """(name, ms, overhead vs CE in %) for one U-Net training step with each loss."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=s.classes, channels=(32, 64, 128, 256), strides=(2, 2, 2))
    net = net.to(s.device)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    image = torch.randn((2, 1) + (s.size,) * 3, generator=gen).to(s.device)
    target = torch.randint(0, s.classes, (2, 1) + (s.size,) * 3, generator=gen).to(s.device)
    autocast = torch.autocast(s.device.type, dtype=torch.bfloat16) if s.autocast else contextlib.nullcontext()

    def step(loss_fn: nn.Module) -> Callable[[], None]:
        def run() -> None:
            optimiser.zero_grad(set_to_none=True)
            with autocast:
                loss = loss_fn(net(image), target)
            loss.backward()
            optimiser.step()

        return run

    fns = {name: step(make_loss(name, s.classes).to(s.device)) for name in names}
    times = _interleaved_times(fns, s.train_reps, s.device, s.cpu_clock)
    return [
        (name, statistics.median(times[name]) * 1e3, 100 * (_median_ratio(times, name, names[0]) - 1)) for name in names
    ]


def machine_load() -> str:
    """``uptime``'s load averages (the other processes sharing the CPU)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def memory_child(name: str, size: int, classes: int) -> dict:
    """Peak resident MiB of one forward + backward of ``name`` above the allocated inputs (this process)."""
    from benchmarks.bench_export import _reset_peak, _status

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn((1, classes) + (size,) * 3, generator=gen) * 3).requires_grad_(True)
    target = torch.randint(0, classes, (1,) + (size,) * 3, generator=gen)
    loss_fn = F.cross_entropy if name == "F.cross_entropy" else make_loss(name, classes)
    # one-time costs are not the loss's memory: imports and compiled kernels (numba's import and JIT
    # for L1-ACE: about 190 MiB, once per process) happen in a first call on an 8^3 input
    small = torch.randn((1, classes) + (8,) * 3, generator=gen).requires_grad_(True)
    loss_fn(small, torch.randint(0, classes, (1,) + (8,) * 3, generator=gen)).backward()
    baseline = _status("VmRSS")
    _reset_peak()
    peak_reset = _status("VmHWM") - baseline < 64
    loss_fn(logits, target).backward()
    return {"peak_mib": _status("VmHWM") - baseline, "peak_reset": peak_reset}


def bench_memory(size: int, classes: int, names: Sequence[str]) -> list[tuple[str, float, bool]]:
    """(name, peak MiB above the inputs, whether the peak could be reset) of each loss, in a fresh process."""
    rows = []
    for name in names:
        cmd = [sys.executable, "-m", "benchmarks.bench_losses", "--memory-child", name, "--size", str(size),
               "--classes", str(classes)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"bench_losses memory child {name} failed:\n{out.stderr[-4000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((name, row["peak_mib"], row["peak_reset"]))
    return rows


def _print_memory(size: int, classes: int, rows: list[tuple[str, float, bool]], num_bins: int = 20) -> None:
    voxels = size**3
    logits_mib = voxels * classes * 4 / 2**20
    full_mib = voxels * classes * num_bins * 4 / 2**20
    print(f"\n### Peak memory of forward + backward, logits (1, {classes}, {size}, {size}, {size}) float32 "
          f"({logits_mib:.0f} MiB), CPU, fresh process per loss\n")  # fmt: skip
    print(f"One (N, C, bins) float32 tensor at N = {size}^3, C = {classes}, bins = {num_bins}: {full_mib:.0f} MiB.\n")
    print("| loss | peak MiB above the inputs | x logits size | x one (N, C, bins) tensor |")
    print("|---|---:|---:|---:|")
    for name, peak, reset in rows:
        note = "" if reset else " (peak not reset: upper bound)"
        print(f"| {name} | {peak:.0f}{note} | {peak / logits_mib:.2f} | {peak / full_mib:.2f} |")


def _where(s: Settings) -> str:
    if s.device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads, {'process CPU time' if s.cpu_clock else 'wall time'})"
    return f"cuda ({torch.cuda.get_device_name(s.device)})"


def _print_alone(s: Settings, alone) -> None:
    print(f"\n### Loss alone, forward + backward, logits (2, {s.classes}, {s.size}, {s.size}, {s.size}) float32, "
          f"{_where(s)}, {s.reps} rounds\n")  # fmt: skip
    mem = s.device.type == "cuda"
    print("| loss | median ms | x CE (median of paired ratios) |" + (" peak extra MiB |" if mem else ""))
    print("|---|---:|---:|" + ("---:|" if mem else ""))
    for name, ms, ratio, peak in alone:
        print(f"| {name} | {ms:.2f} | {ratio:.2f} |" + (f" {peak:.0f} |" if mem else ""), flush=True)


def _print_train(s: Settings, train) -> None:
    precision = "bf16 autocast" if s.autocast else "float32"
    print(f"\n### Training step, MONAI 3D UNet (32-256), batch 2x1x{s.size}^3, Adam, {precision}, {_where(s)}, "
          f"{s.train_reps} rounds\n")  # fmt: skip
    print("| loss | median ms / step | overhead vs CE (median of paired ratios) |")
    print("|---|---:|---:|")
    for name, ms, overhead in train:
        print(f"| {name} | {ms:.1f} | {overhead:+.1f} % |", flush=True)


def run(s: Settings, losses: Sequence[str], train_losses: Sequence[str]) -> None:
    print(f"\nmachine load before: {machine_load()}", flush=True)
    _print_alone(s, bench_losses_alone(s, losses))
    print(f"\nmachine load: {machine_load()}", flush=True)
    if train_losses:
        _print_train(s, bench_training_step(s, train_losses))
        print(f"\nmachine load after: {machine_load()}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_losses", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CPU, then the GPU when CUDA is available")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--size", type=int, default=None, help="spatial size S (default 64 on CPU, 96 on GPU)")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--reps", type=int, default=None, help="rounds for the losses alone (default 15 CPU, 30 GPU)")
    parser.add_argument("--train-reps", type=int, default=None, help="training steps per loss (default 11 CPU, 20 GPU)")
    parser.add_argument("--no-train", action="store_true", help="skip the U-Net training step")
    parser.add_argument("--train-losses", nargs="+", default=list(TRAIN_LOSSES),
                        help="losses of the training step, the first the baseline (default: %(default)s)")  # fmt: skip
    parser.add_argument("--losses", nargs="*", default=None, help="losses to time alone (default: all registered)")
    parser.add_argument("--cpu-clock", action="store_true",
                        help="CPU: time with the process CPU clock (robust to a busy machine; use with --threads 1)")  # fmt: skip
    parser.add_argument("--memory-size", type=int, default=128, help="spatial size M of the memory part (CPU; 0 skips it)")
    parser.add_argument("--memory-losses", nargs="*", default=list(MEMORY_LOSSES), help="losses of the memory part")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.size or 128, args.classes)))
        return 0

    losses = args.losses if args.losses is not None else list_losses()
    devices = []
    if args.device in ("auto", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available")
        devices.append(torch.device("cuda"))

    torch.set_num_threads(args.threads)
    for device in devices:
        gpu = device.type == "cuda"
        settings = Settings(
            device=device,
            size=args.size or (96 if gpu else 64),
            classes=args.classes,
            reps=args.reps or (30 if gpu else 15),
            train_reps=args.train_reps or (20 if gpu else 11),
            autocast=gpu,
            cpu_clock=args.cpu_clock and not gpu,
        )
        run(settings, losses, [] if args.no_train else args.train_losses)
    if torch.device("cpu") in devices and args.memory_size:
        _print_memory(args.memory_size, args.classes, bench_memory(args.memory_size, args.classes, args.memory_losses))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
