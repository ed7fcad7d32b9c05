"""Evaluation cost: sliding-window inference plus every segcalib metric, against bare MONAI
``sliding_window_inference`` of the same network and against MONAI's own metrics.

A MONAI 3D UNet (random weights) predicts an N^3 volume with 4 classes; a strong one-hot bias
towards a blob ground truth makes the prediction near-correct, like a trained model's. segcalib
then computes the calibration statistics of three regions (all, foreground, boundary band),
Dice and HD / HD95 / ASSD for the three foreground classes, on the same device.

    python -m benchmarks.bench_evaluate --size 128          # CPU
    python -m benchmarks.bench_evaluate --size 256 --repeat 5   # GPU (default when CUDA is available); target <= 1.3x bare MONAI
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def _blobs(size: int, classes: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    label = torch.zeros(size, size, size, dtype=torch.long)
    for k in range(1, classes):
        centre = (torch.rand(3, generator=g) * 0.5 + 0.25) * size
        radius = (torch.rand(3, generator=g) * 0.1 + 0.1) * size
        inside = (((grid - centre[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(0) <= 1
        label[inside] = k
    return label[None].to(device)


def _timed(fn, device: torch.device, repeat: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], out


def _setup(size: int, classes: int, roi: int, device: torch.device):
    """(bare, segcalib_full, label, bias): the two timed callables and their inputs."""
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet

    from segcalib.metrics import CalibrationMetric, dice, surface_distances
    from segcalib.spatial.regions import default_regions

    torch.manual_seed(0)
    net = UNet(3, 1, classes, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2).to(device).eval()
    label = _blobs(size, classes, device)
    image = (label.float() + 0.3 * torch.randn(label.shape, device=device))[:, None]
    bias = 8.0 * F.one_hot(label, classes).permute(0, 4, 1, 2, 3).float()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def bare():
        with torch.no_grad(), autocast:
            return sliding_window_inference(image, [roi] * 3, 4, net, overlap=0.25, mode="gaussian")

    def segcalib_full():
        logits = bare().float() + bias
        probs = torch.softmax(logits, 1)
        metric = CalibrationMetric(classes, regions=default_regions(), validate_args=False)
        metric.update(probs, label, spacing=(1.0, 1.0, 1.0))
        pred = probs.argmax(1)
        scores = dice(pred, label, classes)
        distances = [surface_distances(pred[0] == k, label[0] == k, (1.0, 1.0, 1.0)) for k in range(1, classes)]
        return metric.compute(), scores, distances

    return bare, segcalib_full, label, bias


def measure(size: int = 128, classes: int = 4, repeat: int = 3, roi: int = 96, device: str | None = None) -> dict:
    """Median ms of bare sliding-window inference and of inference + every segcalib metric."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bare, segcalib_full, _, _ = _setup(size, classes, roi, dev)
    t_bare, _ = _timed(bare, dev, repeat)
    t_full, (report, _, distances) = _timed(segcalib_full, dev, repeat)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return {"device": name, "size": size, "classes": classes, "roi": roi, "repeat": repeat,
            "bare_ms": t_bare * 1e3, "full_ms": t_full * 1e3, "ratio": t_full / t_bare,
            **{f"ece_{name}": region.ece for name, region in report.regions.items()},
            "hd95_class1_mm": distances[0]["hd95"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--skip-monai-metrics", action="store_true")
    args = parser.parse_args(argv)

    r = measure(args.size, args.classes, args.repeat, args.roi, args.device)
    print(f"device: {r['device']}; volume {args.size}^3, {args.classes} classes, ROI {args.roi}^3, overlap 0.25")
    print(f"bare MONAI sliding_window_inference: {r['bare_ms']:9.1f} ms")
    print(f"segcalib inference + all metrics:    {r['full_ms']:9.1f} ms  ({r['ratio']:.2f}x bare; target <= 1.3x)")
    eces = ", ".join(f"{k[4:]} {v:.4f}" for k, v in r.items() if k.startswith("ece_"))
    print(f"  ECE {eces}, HD95 class 1 {r['hd95_class1_mm']:.2f} mm")
    if not args.skip_monai_metrics:
        from monai.metrics import (
            CalibrationErrorMetric,
            DiceMetric,
            HausdorffDistanceMetric,
            SurfaceDistanceMetric,
        )

        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        bare, _, label, bias = _setup(args.size, args.classes, args.roi, device)
        logits = bare().float() + bias
        probs = torch.softmax(logits, 1)
        pred = F.one_hot(probs.argmax(1), args.classes).permute(0, 4, 1, 2, 3).float()
        gt = F.one_hot(label, args.classes).permute(0, 4, 1, 2, 3).float()

        def monai_metrics():
            DiceMetric(include_background=False)(pred, gt)
            HausdorffDistanceMetric(include_background=False, percentile=95)(pred, gt)
            HausdorffDistanceMetric(include_background=False)(pred, gt)
            SurfaceDistanceMetric(include_background=False, symmetric=True)(pred, gt)
            CalibrationErrorMetric(num_bins=15, include_background=True)(probs, gt)

        t_monai, _ = _timed(monai_metrics, device, 1)
        t_bare = r["bare_ms"] / 1e3
        print(f"MONAI's metrics alone (Dice, HD95, HD, ASSD, CECE; no regions): {t_monai * 1000:9.1f} ms "
              f"(inference + these: {(t_bare + t_monai) / t_bare:.2f}x bare)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
