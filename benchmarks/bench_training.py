"""Training throughput of the 3D recipe and the share of time spent waiting for data.

Runs ``--steps`` optimisation steps of ``configs/hippocampus/base.yaml`` (MONAI UNet, CE) through
segcalib's own data pipeline (CacheDataset, patch sampling, the trainer's batching) and reports
voxels per second and the fraction of wall time the step waited for its batch. On a GPU it uses
bf16 autocast and synchronises before reading the clock.

    python -m benchmarks.bench_training --steps 30
    python -m benchmarks.bench_training --patch 96 96 96 --workers 4   # the GPU target: 2 x 96^3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "hippocampus" / "base.yaml"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--patch", nargs=3, type=int, default=None)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--loss", default="ce")
    args = parser.parse_args(argv)

    from segcalib.config import load_config
    from segcalib.data.datasets import training_dataset
    from segcalib.runs import RunDir
    from segcalib.training import Trainer

    overrides = [f"loss.name={args.loss}", f"data.num_workers={args.workers}", "train.iterations_per_epoch=100000"]
    if args.patch:
        overrides.append(f"data.patch_size=[{','.join(map(str, args.patch))}]")
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg, RunDir(Path(tempfile.mkdtemp()) / "run"), progress=False)
    dataset = training_dataset(cfg.data, trainer.train_cases)
    batches = trainer._batches(dataset, epoch=0)
    device = trainer.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    waited = computed = 0.0
    voxels = 0
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        image, label = next(batches)
        image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True).long()
        sync()
        t1 = time.perf_counter()
        with trainer._autocast():
            logits = trainer.model(image)
        loss = trainer.loss_fn(logits.float(), label)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        sync()
        t2 = time.perf_counter()
        if step >= args.warmup:
            waited += t1 - t0
            computed += t2 - t1
            voxels += image[:, 0].numel()
    total = waited + computed
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; batch {cfg.train.batch_size} x {cfg.data.patch_size}; loss {args.loss}; "
          f"amp {trainer.amp_dtype}; data workers {args.workers}")
    print(f"steps: {args.steps}, {1000 * total / args.steps:.1f} ms/step, "
          f"{voxels / total / 1e6:.2f} Mvoxels/s, waiting for data {100 * waited / total:.1f} % of the time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
