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


def measure(
    config: str | Path = REPO / "configs" / "hippocampus" / "base.yaml",
    steps: int = 30,
    warmup: int = 3,
    patch: list[int] | None = None,
    workers: int = 0,
    loss: str = "ce",
    device: str = "auto",
) -> dict:
    """ms per step, Mvoxel/s and the share (%) of wall time spent waiting for the next batch."""
    from segcalib.config import load_config
    from segcalib.data.datasets import training_dataset
    from segcalib.runs import RunDir
    from segcalib.training import Trainer
    from segcalib.training.patches import patch_batches

    overrides = [f"loss.name={loss}", f"data.num_workers={workers}", "train.iterations_per_epoch=100000",
                 f"train.device={device}"]
    if patch:
        overrides.append(f"data.patch_size=[{','.join(map(str, patch))}]")
    cfg = load_config(config, overrides)
    trainer = Trainer(cfg, RunDir(Path(tempfile.mkdtemp()) / "run"), progress=False)
    dataset = training_dataset(cfg.data, trainer.train_cases)
    batches = patch_batches(dataset, cfg, trainer._epoch_seed(0), 0, pin_memory=trainer.device.type == "cuda")
    dev = trainer.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    waited = computed = 0.0
    voxels = 0
    for step in range(warmup + steps):
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
    total = waited + computed
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return {"device": name, "batch_size": cfg.train.batch_size, "patch_size": list(cfg.data.patch_size),
            "loss": loss, "amp": str(trainer.amp_dtype), "workers": workers, "steps": steps,
            "ms_per_step": 1000 * total / steps, "mvoxels_per_s": voxels / total / 1e6,
            "data_wait_pct": 100 * waited / total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "hippocampus" / "base.yaml"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--patch", nargs=3, type=int, default=None)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--loss", default="ce")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args(argv)

    r = measure(args.config, args.steps, args.warmup, args.patch, args.workers, args.loss, args.device)
    print(f"device: {r['device']}; batch {r['batch_size']} x {r['patch_size']}; loss {r['loss']}; "
          f"amp {r['amp']}; data workers {r['workers']}")
    print(f"steps: {r['steps']}, {r['ms_per_step']:.1f} ms/step, "
          f"{r['mvoxels_per_s']:.2f} Mvoxels/s, waiting for data {r['data_wait_pct']:.1f} % of the time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
