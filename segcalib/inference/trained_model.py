"""A trained network ready for inference: its run's config, weights and class names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from segcalib.config import ExperimentConfig, load_config
from segcalib.errors import RunError
from segcalib.inference.sliding_window import SlidingWindow, volume_network
from segcalib.models import build_model
from segcalib.runs.checkpoint import load_checkpoint
from segcalib.runs.run_dir import open_run
from segcalib.utils.devices import select_device


@dataclass
class TrainedModel:
    cfg: ExperimentConfig
    net: nn.Module  # a function of 3D windows (2D networks wrapped), eval mode
    window: SlidingWindow
    checkpoint: Path
    epoch: int
    num_classes: int
    class_names: list[str]
    config_hash: str
    device: torch.device
    run_dir: Path = Path(".")  # the run folder it came from


def load_trained_model(run_dir: str | Path, which: str = "best", device: str | torch.device | None = None) -> TrainedModel:
    """Load ``checkpoints/<which>.pt`` (or a path) of a run folder onto ``device``."""
    run = open_run(run_dir)
    cfg = load_config(run.config)
    path = run.checkpoint(which)
    state = load_checkpoint(path)
    device = select_device(device)
    net = build_model(
        cfg.model.name,
        spatial_dims=cfg.data.spatial_dims,
        in_channels=int(state["num_channels"]),
        out_channels=int(state["num_classes"]),
        **cfg.model.params,
    )
    try:
        net.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise RunError(f"{path}: weights do not fit the run's model ({str(exc).splitlines()[0]})") from exc
    net = volume_network(net, cfg).to(device).eval()
    return TrainedModel(
        cfg=cfg,
        net=net,
        window=SlidingWindow.from_config(cfg),
        checkpoint=path,
        epoch=int(state["epoch"]),
        num_classes=int(state["num_classes"]),
        class_names=list(state["class_names"]),
        config_hash=str(state["config_hash"]),
        device=device,
        run_dir=run.root,
    )
