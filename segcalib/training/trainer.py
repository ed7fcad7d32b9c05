"""The training loop: patches -> network -> calibration loss, validation, CALS updates, checkpoints.

Each epoch draws its randomness (shuffling, augmentation, dropout) from seeds derived from
``(train.seed, epoch, rank)`` alone, so a resumed run repeats exactly the epochs an
uninterrupted one would have run. Only rank 0 writes; checkpoints are written atomically,
``best.pt`` before ``last.pt``, so that a kill at any moment leaves a consistent run folder.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.utils import set_determinism
from torch import nn

from segcalib.config.schema import ExperimentConfig, with_keys_added_since
from segcalib.data import check_manifest, load_manifest
from segcalib.data.datasets import patch_workers, training_dataset, volume_dataset
from segcalib.errors import ConfigError, DataError, RunError, SegcalibError
from segcalib.inference.sliding_window import SlidingWindow, volume_network
from segcalib.losses import AdaptiveLoss, CalibrationLoss, build_loss, loss_parameters
from segcalib.models import build_model
from segcalib.runs.checkpoint import load_checkpoint, restore_rng_state, save_checkpoint
from segcalib.training.metrics_log import MetricsLog
from segcalib.training.optim import build_optimizer, build_scheduler
from segcalib.training.patches import patch_batches, steps_per_epoch
from segcalib.runs.run_dir import RunDir, check_run_config
from segcalib.training.validation import ValidationResult, validate
from segcalib.utils.devices import cpu_has_native_bf16, select_device
from segcalib.utils.distributed import all_reduce_sum, barrier, is_distributed, is_main_process, rank, world_size
from segcalib.utils.files import write_text_atomic
from segcalib.utils.progress import progress_bar

log = logging.getLogger("segcalib")


class TrainingDiverged(SegcalibError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainSummary:
    run_dir: RunDir
    epochs_run: int
    last_epoch: int
    best_epoch: int
    best_score: float
    last_validation: ValidationResult | None


def build_loss_for(cfg: ExperimentConfig, num_classes: int) -> CalibrationLoss:
    """The configured loss with data-given parameters filled in: ``num_classes`` from the manifest,
    and ``spacing`` (mm per axis, for losses with regions in mm) from ``data.spacing`` in 3D mode."""
    params = dict(cfg.loss.params)
    accepted = loss_parameters(cfg.loss.name)
    if "num_classes" in accepted:
        given = params.setdefault("num_classes", num_classes)
        if given != num_classes:
            raise ConfigError(f"loss.num_classes: {given} but the manifest declares {num_classes} classes")
    if "spacing" in accepted and cfg.data.spacing and cfg.data.mode == "3d":
        params.setdefault("spacing", [float(s) for s in cfg.data.spacing])
    return build_loss(cfg.loss.name, **params)


class Trainer:
    """Train one experiment into one run folder (see :mod:`segcalib.training`)."""

    def __init__(self, cfg: ExperimentConfig, run_dir: RunDir, resume: bool = False, progress: bool = True) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume = resume
        self.progress = progress and is_main_process()
        self.device = select_device(cfg.train.device, setting="train.device")
        self._configure_determinism()

        self.manifest = load_manifest(cfg.data.manifest, split_seed=cfg.data.split_seed, require_training=True)
        check_manifest(self.manifest, splits=("training", "validation"))
        if self.manifest.ignore_label is not None:
            raise DataError(f"{self.manifest.path}: label 'ignore' = {self.manifest.ignore_label}: segcalib train does "
                            "not train with nnU-Net's ignore label (train with nnU-Net; calibrate and evaluate here)")
        self.num_classes = self.manifest.num_classes
        self.class_names = self.manifest.class_names
        self.train_cases = self.manifest.labelled("training")
        self.val_cases = tuple(c for c in self.manifest.cases("validation") if c.label is not None)

        self.loss_fn = build_loss_for(cfg, self.num_classes).to(self.device)
        self.adaptive = isinstance(self.loss_fn, AdaptiveLoss)
        if self.adaptive and not self.val_cases:
            raise ConfigError(f"loss.name: {cfg.loss.name!r} updates its multipliers on validation data, but the manifest has none")

        torch.manual_seed(cfg.train.seed)
        net = build_model(
            cfg.model.name,
            spatial_dims=cfg.data.spatial_dims,
            in_channels=self.manifest.num_channels,
            out_channels=self.num_classes,
            **cfg.model.params,
        ).to(self.device)
        self.net = net
        self.model = self._wrap_ddp(net)
        self.optimizer = build_optimizer(net.parameters(), cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.window = SlidingWindow.from_config(cfg)

        self.start_epoch = 0
        self.saved_epoch = 0
        self.best_score = -math.inf
        self.best_epoch = 0
        self.log = MetricsLog(run_dir.metrics_csv, run_dir.tensorboard if is_main_process() else None)

    # -- public ------------------------------------------------------------------------------

    def fit(self) -> TrainSummary:
        cfg = self.cfg
        self._prepare_run_dir()
        train_ds = training_dataset(cfg.data, self.train_cases, device=self.device)
        if cfg.data.num_workers and not patch_workers(cfg.data, self.device):
            log.info("data.num_workers: the random patch transforms run on %s in the loader's thread; no worker processes", self.device)
        val_ds = volume_dataset(cfg.data, self.val_cases[rank() :: world_size()]) if self.val_cases else None
        last_val: ValidationResult | None = None
        epochs_run = 0
        if self.start_epoch >= cfg.train.epochs:
            log.info("%s: already trained for %d epochs; nothing to do", self.run_dir.root, self.start_epoch)
        for epoch in range(self.start_epoch, cfg.train.epochs):
            started = time.time()
            self._seed_epoch(epoch)
            train_stats = self._train_one_epoch(train_ds, epoch)
            validate_now = val_ds is not None and (
                self.adaptive or (epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == cfg.train.epochs
            )
            if validate_now:
                last_val = validate(
                    volume_network(self.net, cfg),
                    val_ds,
                    self.window,
                    self.loss_fn,
                    self.num_classes,
                    self.device,
                    update_adaptive_loss=self.adaptive,
                    adaptive_slice_axis=cfg.data.slice_axis if cfg.data.mode == "2d" else None,
                )
                if self.adaptive:
                    self.loss_fn.step()
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            row: dict[str, Any] = {"epoch": epoch + 1, **train_stats}
            if validate_now:
                row.update(last_val.as_row(self.class_names))
            if self.adaptive:
                row.update(self.loss_fn.logged_state())
            row.update({"lr": lr, "seconds": time.time() - started})
            improved = validate_now and last_val.score(cfg.train.best_metric) > self.best_score
            if improved:
                self.best_score, self.best_epoch = last_val.score(cfg.train.best_metric), epoch + 1
            if val_ds is None:
                improved, self.best_epoch = True, epoch + 1
            self._end_epoch(epoch + 1, row, improved)
            epochs_run += 1
        self.log.close()
        barrier()
        return TrainSummary(self.run_dir, epochs_run, max(self.start_epoch, cfg.train.epochs), self.best_epoch, self.best_score, last_val)

    # -- epochs ------------------------------------------------------------------------------

    def _train_one_epoch(self, dataset, epoch: int) -> dict[str, float]:
        cfg = self.cfg.train
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        steps = 0
        batches = patch_batches(dataset, self.cfg, self._epoch_seed(epoch), epoch, workers=patch_workers(self.cfg.data, self.device))
        bar = progress_bar(steps_per_epoch(dataset, self.cfg), f"epoch {epoch + 1}/{cfg.epochs}", self.progress)
        for step, (image, label) in enumerate(batches):
            image = image.to(self.device, non_blocking=True)
            label = label.to(self.device, non_blocking=True).long()
            with self._autocast():
                logits = self.model(image)
            loss = self.loss_fn(logits.float(), label)
            self._check_finite(loss, epoch, step)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            parts = {"loss": loss.detach(), **self.loss_fn.last_components}
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value.detach().double()
            steps += 1
            bar.update(1)
        bar.close()
        if steps == 0:
            raise RunError("no training patches were produced; check data.patch_size and the training cases")
        stats = {}
        for key, total in sums.items():
            total = torch.as_tensor(total, device=self.device)
            reduced = all_reduce_sum(total.clone()) / world_size()
            stats["train_loss" if key == "loss" else f"train_{key}"] = float(reduced / steps)
        return stats

    def _end_epoch(self, epoch: int, row: dict[str, Any], improved: bool) -> None:
        if is_main_process():
            self.log.append(row)
            state = self._checkpoint_state(epoch)
            if improved:
                save_checkpoint(self.run_dir.best, state)
            save_checkpoint(self.run_dir.last, state)
            log.info(_describe(row))
        self.saved_epoch = epoch
        barrier()

    # -- state -------------------------------------------------------------------------------

    def _checkpoint_state(self, epoch: int) -> dict[str, Any]:
        return {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "loss": self.loss_fn.state_dict(),
            "epoch": epoch,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "config": self.cfg.to_dict(),
            "config_hash": self.cfg.config_hash(),
            "num_classes": self.num_classes,
            "num_channels": self.manifest.num_channels,
            "class_names": list(self.class_names),
        }

    def _prepare_run_dir(self) -> None:
        self.run_dir.check(resume=self.resume)  # every rank, before anyone writes
        if self.resume:
            check_run_config(self.run_dir, self.cfg.to_dict(), "resume", with_keys_added_since)
        if self.resume and not self.run_dir.last.exists():
            log.info("%s: no finished epoch to resume; starting at epoch 1", self.run_dir.root)
            self.resume = False
        barrier()
        if is_main_process():
            self.run_dir.create()
        if self.resume:
            self._load_resume_state()
        elif is_main_process():
            write_text_atomic(self.run_dir.config, self.cfg.to_yaml())

    def _load_resume_state(self) -> None:
        state = load_checkpoint(self.run_dir.last, map_location=self.device, purpose="resume")
        try:
            self.net.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.loss_fn.load_state_dict(state["loss"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RunError(f"{self.run_dir.last}: its states do not fit this run's model, optimiser or loss ({first})") from None
        self.start_epoch = self.saved_epoch = int(state["epoch"])
        self.best_score = float(state["best_score"])
        self.best_epoch = int(state["best_epoch"])
        restore_rng_state(state["rng"])
        self.log.load(up_to_epoch=self.start_epoch)
        if is_main_process():
            write_text_atomic(self.run_dir.config, self.cfg.to_yaml())
        log.info("%s: resuming after epoch %d", self.run_dir.root, self.start_epoch)

    # -- helpers -----------------------------------------------------------------------------

    def _epoch_seed(self, epoch: int) -> int:
        return (self.cfg.train.seed * 1_000_003 + epoch * 10_007 + rank()) % (2**31 - 1)

    def _seed_epoch(self, epoch: int) -> None:
        seed = self._epoch_seed(epoch)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _configure_determinism(self) -> None:
        if self.cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            set_determinism(seed=self.cfg.train.seed)
            torch.backends.cudnn.benchmark = False
        else:
            torch.backends.cudnn.benchmark = True

    def _wrap_ddp(self, net: nn.Module) -> nn.Module:
        if not is_distributed():
            return net
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(net, device_ids=ids)

    def _amp_dtype(self) -> torch.dtype | None:
        amp = self.cfg.train.amp
        if amp == "none":
            return None
        if self.device.type == "cpu":
            if not (amp == "bf16" and self.cfg.train.amp_on_cpu):
                return None
            if not cpu_has_native_bf16():
                log.warning("train.amp_on_cpu: this CPU has no native bf16 (AMX or AVX512-BF16); training in float32")
                return None
            return torch.bfloat16
        if self.device.type != "cuda":
            return None
        if amp == "bf16" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _check_finite(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        bad = (~torch.isfinite(loss.detach())).to(torch.float64).reshape(1)
        if bool(all_reduce_sum(bad).item()):
            parts = ", ".join(
                f"{k}={float(v):.4g}" for k, v in self.loss_fn.last_components.items()
            )
            kept = (
                f"; the last good checkpoint is {self.run_dir.last} (epoch {self.saved_epoch})"
                if self.saved_epoch
                else "; no epoch finished, so there is no checkpoint"
            )
            raise TrainingDiverged(
                f"{self.run_dir.root}: training stopped at epoch {epoch + 1}, step {step + 1}: the loss is "
                f"{float(loss.detach()):.4g} ({parts}){kept}. Lower train.lr, enable train.grad_clip or check the data."
            )


def _describe(row: dict[str, Any]) -> str:
    keys = ("train_loss", "val_dice_fg_mean", "val_ece", "lr", "seconds")
    parts = [f"epoch {row['epoch']}"] + [f"{k}={row[k]:.4g}" for k in keys if k in row]
    return "  ".join(parts)
