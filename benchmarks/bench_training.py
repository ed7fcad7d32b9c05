"""Training throughput of the 3D recipe and the share of time spent waiting for data.

Runs ``--steps`` optimisation steps of ``configs/hippocampus/base.yaml`` (MONAI UNet, CE) through
segcalib's data pipeline and reports ms per step, voxels per second and the fraction of wall time
the step waited for its batch, for two pipelines side by side (alternating, ``--rounds`` times):

- ``thread`` (the trainer's): the deterministic half cached once, the random half per sample on the
  training device, batches prepared by ``ThreadDataLoader``'s thread while a step trains;
- ``legacy`` (before it): the whole chain in a ``CacheDataset`` (deterministic prefix cached, the
  cache copied per sample, random transforms on the CPU) and a plain ``DataLoader``.

On a GPU it uses bf16 autocast and synchronises before reading the clock.

    python -m benchmarks.bench_training --steps 30
    python -m benchmarks.bench_training --patch 96 96 96 --workers 4   # the GPU target: 2 x 96^3
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def measure(
    config: str | Path = REPO / "configs" / "hippocampus" / "base.yaml",
    steps: int = 30,
    warmup: int = 3,
    patch: list[int] | None = None,
    workers: int = 0,
    loss: str = "ce",
    device: str = "auto",
    pipeline: str = "thread",
) -> dict:
    """ms per step, Mvoxel/s and the share (%) of wall time spent waiting for the next batch, for
    the trainer's ``thread`` pipeline or the ``legacy`` one it replaced."""
    from monai.data import CacheDataset

    from segcalib.config import load_config
    from segcalib.data.datasets import cache_workers, patch_workers, training_dataset
    from segcalib.data.transforms import case_to_item, training_transforms
    from segcalib.runs import RunDir
    from segcalib.training import Trainer
    from segcalib.training.patches import patch_batches

    overrides = [f"loss.name={loss}", f"data.num_workers={workers}", "train.iterations_per_epoch=100000",
                 f"train.device={device}"]
    if patch:
        overrides.append(f"data.patch_size=[{','.join(map(str, patch))}]")
    cfg = load_config(config, overrides)
    trainer = Trainer(cfg, RunDir(Path(tempfile.mkdtemp()) / "run"), progress=False)
    dev = trainer.device
    if pipeline == "thread":
        dataset = training_dataset(cfg.data, trainer.train_cases, device=dev)
        workers = patch_workers(cfg.data, dev)  # none on a GPU: the random transforms run there
        batches = patch_batches(dataset, cfg, trainer._epoch_seed(0), 0, workers=workers)
    elif pipeline == "legacy":
        items = [case_to_item(c) for c in trainer.train_cases]
        dataset = CacheDataset(items, transform=training_transforms(cfg.data), num_workers=cache_workers(cfg.data), progress=False)
        batches = patch_batches(dataset, cfg, trainer._epoch_seed(0), 0, pin_memory=dev.type == "cuda", threaded=False)
    else:
        raise ValueError(f"pipeline: thread or legacy, not {pipeline!r}")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    waited = computed = 0.0
    voxels = 0
    for step in range(warmup + steps):
        if step == warmup:
            cpu_started = time.process_time()
        t0 = time.perf_counter()
        image, label = next(batches)
        image, label = image.to(dev, non_blocking=True), label.to(dev, non_blocking=True).long()
        sync()
        t1 = time.perf_counter()
        with trainer._autocast():
            logits = trainer.model(image)
        loss_value = trainer.loss_fn(logits.float(), label)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss_value.backward()
        trainer.optimizer.step()
        sync()
        t2 = time.perf_counter()
        if step >= warmup:
            waited += t1 - t0
            computed += t2 - t1
            voxels += image[:, 0].numel()
    cpu_seconds = time.process_time() - cpu_started  # every thread of this process, loader included
    total = waited + computed
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    batches.close()
    return {"device": name, "pipeline": pipeline, "batch_size": cfg.train.batch_size, "patch_size": list(cfg.data.patch_size),
            "loss": loss, "amp": str(trainer.amp_dtype), "workers": workers, "steps": steps,  # worker processes actually used
            "ms_per_step": 1000 * total / steps, "cpu_ms_per_step": 1000 * cpu_seconds / steps,
            "mvoxels_per_s": voxels / total / 1e6,
            "data_wait_pct": 100 * waited / total}


def machine_load() -> str:
    """``uptime``'s load averages: other jobs on the machine move the timings."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "uptime unavailable"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "hippocampus" / "base.yaml"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--patch", nargs=3, type=int, default=None)
    parser.add_argument("--workers", type=int, default=0, help="data.num_workers (worker processes on the CPU)")
    parser.add_argument("--loss", default="ce")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--pipelines", nargs="+", choices=("thread", "legacy"), default=["legacy", "thread"])
    parser.add_argument("--rounds", type=int, default=1, help="alternate the pipelines this many times")
    args = parser.parse_args(argv)

    print(f"load before: {machine_load()}")
    results: dict[str, list[dict]] = {p: [] for p in args.pipelines}
    for _ in range(args.rounds):
        for pipeline in args.pipelines:
            r = measure(args.config, args.steps, args.warmup, args.patch, args.workers, args.loss, args.device, pipeline)
            results[pipeline].append(r)
            print(f"  {pipeline:<7} {r['ms_per_step']:8.1f} ms/step  {r['mvoxels_per_s']:6.2f} Mvoxels/s  "
                  f"waiting for data {r['data_wait_pct']:5.1f} %  CPU time {r['cpu_ms_per_step']:8.1f} ms/step")
    first = next(iter(results.values()))[0]
    print(f"device: {first['device']}; batch {first['batch_size']} x {first['patch_size']}; loss {first['loss']}; "
          f"amp {first['amp']}; data workers {first['workers']}; {first['steps']} steps after {args.warmup} warm-up")
    for pipeline, runs in results.items():
        ms = sorted(r["ms_per_step"] for r in runs)[len(runs) // 2]
        wait = sorted(r["data_wait_pct"] for r in runs)[len(runs) // 2]
        mvox = sorted(r["mvoxels_per_s"] for r in runs)[len(runs) // 2]
        cpu = sorted(r["cpu_ms_per_step"] for r in runs)[len(runs) // 2]
        print(f"{pipeline:<7} (median of {len(runs)}): {ms:.1f} ms/step, {mvox:.2f} Mvoxels/s, waiting for data "
              f"{wait:.1f} % of the time; CPU time (all threads) {cpu:.1f} ms/step")
    print(f"load after: {machine_load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
