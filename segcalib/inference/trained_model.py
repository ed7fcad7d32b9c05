"""A trained network ready for inference: its run's config, weights and class names.

The checkpoint must belong to the run: one whose config differs from the run's (beyond
``train.epochs``) is refused, since the run's preprocessing and classes would be applied to
another network; with ``allow_foreign=True`` it is used with the config it carries. A run that
is still training (its last checkpoint short of ``train.epochs``, or its folder held by a
``train`` command) gives a warning naming the epoch, and ``run_finished`` records it.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segcalib.config import ExperimentConfig, load_config
from segcalib.config.schema import with_keys_added_since
from segcalib.errors import ConfigError, DataError, RunError
from segcalib.inference.sliding_window import SlidingWindow, volume_network
from segcalib.models import build_model
from segcalib.runs.checkpoint import checkpoint_epoch, load_checkpoint
from segcalib.runs.run_dir import CONFIG_NAME, RunDir, config_mismatch, open_run
from segcalib.utils.devices import select_device
from segcalib.utils.locks import lock_holder

log = logging.getLogger("segcalib")


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
    num_channels: int | None = None  # input channels the network takes (None: not recorded)
    run_finished: bool = True  # False: exported while the run was still training
    foreign_config: dict[str, Any] | None = field(default=None, repr=False)  # a foreign checkpoint's own config

    def record(self) -> dict[str, Any]:
        """What an export record says about where the weights came from."""
        out: dict[str, Any] = {"run_finished": self.run_finished, "foreign_checkpoint": self.foreign_config is not None}
        if self.foreign_config is not None:
            out["checkpoint_config"] = self.foreign_config
        return out

    def check_inputs(self, manifest) -> None:
        """DataError naming ``manifest`` when its cases do not fit the network (channels)."""
        if self.num_channels is not None and manifest.num_channels != self.num_channels:
            raise DataError(
                f"{manifest.path}: its cases have {manifest.num_channels} channel(s) (modalities) but the model "
                f"of {self.checkpoint} takes {self.num_channels}; export a dataset of the modalities it was trained on"
            )


def load_trained_model(
    run_dir: str | Path,
    which: str = "best",
    device: str | torch.device | None = None,
    allow_foreign: bool = False,
) -> TrainedModel:
    """Load ``checkpoints/<which>.pt`` (or a path) of a run folder onto ``device``.

    A checkpoint of another config than the run's is a :class:`RunError` unless
    ``allow_foreign``; then its own config (preprocessing, model, classes) is used.
    """
    run = open_run(run_dir)
    cfg = load_config(run.config)
    path = run.checkpoint(which)
    state = load_checkpoint(path)
    foreign = _foreign_config(run, cfg, path, state, allow_foreign)
    if foreign is not None:
        cfg = foreign
    device = select_device(device)
    try:
        net = build_model(
            cfg.model.name,
            spatial_dims=cfg.data.spatial_dims,
            in_channels=state["num_channels"],
            out_channels=state["num_classes"],
            **cfg.model.params,
        )
    except ConfigError as exc:
        raise ConfigError(f"{path if foreign is not None else run.config}: {exc}") from None
    try:
        net.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise RunError(f"{path}: weights do not fit the run's model ({str(exc).splitlines()[0]})") from exc
    net = volume_network(net, cfg).to(device).eval()
    epoch = state["epoch"]
    return TrainedModel(
        cfg=cfg,
        net=net,
        window=SlidingWindow.from_config(cfg),
        checkpoint=path,
        epoch=epoch,
        num_classes=state["num_classes"],
        class_names=list(state["class_names"]),
        config_hash=state["config_hash"],
        device=device,
        run_dir=run.root,
        num_channels=state["num_channels"],
        run_finished=_run_finished(_home_run(run, path, foreign is not None), cfg, path, epoch),
        foreign_config=state["config"] if foreign is not None else None,
    )


def _foreign_config(
    run: RunDir, cfg: ExperimentConfig, path: Path, state: dict[str, Any], allow_foreign: bool
) -> ExperimentConfig | None:
    """``None`` for a checkpoint of this run; the checkpoint's own config for an allowed foreign one."""
    if state["config_hash"] == cfg.config_hash():
        return None
    changed = config_mismatch(with_keys_added_since(state["config"]), cfg.to_dict())  # epochs may change on resume
    if not changed:
        return None
    if not allow_foreign:
        raise RunError(
            f"{path}: a checkpoint of another config (hash {state['config_hash']}) than the run {run.root} "
            f"(hash {cfg.config_hash()}; changed: {', '.join(changed)}): the run's preprocessing and classes would "
            "be applied to another network. Give that checkpoint's own run folder as --run, or add "
            "--allow-foreign-checkpoint to export it with the config it carries"
        )
    try:
        own = load_config(raw=state["config"])
    except ConfigError as exc:
        raise RunError(f"{path}: the config this checkpoint carries is not valid here ({exc})") from None
    log.warning("%s: a checkpoint of another config than %s (changed: %s); using its own config", path, run.root,
                ", ".join(changed))
    return own


def _home_run(run: RunDir, path: Path, foreign: bool) -> RunDir | None:
    """The run folder a checkpoint was written in (a foreign one: its ``checkpoints/``' parent)."""
    if not foreign:
        return run
    home = RunDir(path.resolve().parent.parent)
    return home if path.resolve().parent == home.checkpoints and (home.root / CONFIG_NAME).exists() else None


def _run_finished(run: RunDir | None, cfg: ExperimentConfig, path: Path, epoch: int) -> bool:
    """Whether the run had finished training; a warning naming the epoch when it had not."""
    last_epoch = epoch
    if run is not None and run.last.exists() and run.last.resolve() != path.resolve():
        try:
            last_epoch = max(epoch, checkpoint_epoch(run.last))
        except RunError as exc:  # a damaged last.pt does not stop the export of another checkpoint
            log.warning("%s", exc)
    trainer = _training_process(run.root) if run is not None else None
    if last_epoch >= cfg.train.epochs and trainer is None:
        return True
    where = run.root if run is not None else path
    busy = f"; `segcalib {trainer}` is training it now" if trainer else ""
    log.warning(
        "%s: the run is unfinished (last checkpoint at epoch %d of %d%s); exporting %s from epoch %d",
        where, last_epoch, cfg.train.epochs, busy, path.name, epoch,
    )
    return False


def _training_process(folder: Path) -> str | None:
    """The command of a live ``train`` process holding ``folder``'s lock, if any."""
    holder = lock_holder(folder)
    command = str(holder.get("command", ""))
    if not command.startswith("train"):
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    if holder.get("host") == socket.gethostname():  # a kill -9 leaves the record: is the holder alive?
        try:
            os.kill(pid, 0)  # signal 0: a check, nothing is sent
        except ProcessLookupError:
            return None
        except OSError:
            pass  # alive, owned by someone else
    return f"{command} (pid {holder.get('pid')})"
