"""The run folder: ``config.yaml``, ``checkpoints/{last,best}.pt``, ``metrics.csv``, TensorBoard events."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from segcalib.errors import RunError
from segcalib.utils.locks import folder_entries

CONFIG_NAME = "config.yaml"


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def is_empty(self) -> bool:
        """No entry but the lock of the command now holding the folder."""
        return not folder_entries(self.root)

    def check(self, resume: bool) -> None:
        """Check (without writing) that a new run may start here, or that there is one to resume."""
        if resume:
            if not self.last.exists() and not self.config.exists():
                raise RunError(f"{self.root}: nothing to resume ({self.last} does not exist); start without --resume")
            return  # without last.pt (killed in the first epoch) the run starts again in its folder
        if self.root.exists() and not self.root.is_dir():
            raise RunError(f"{self.root}: exists and is not a folder")
        if not self.is_empty():
            raise RunError(
                f"{self.root}: run folder is not empty; add --resume to continue it, or choose another --run-dir"
            )

    def create(self) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)

    def checkpoint(self, which: str) -> Path:
        """``best``, ``last`` or a path to a checkpoint file."""
        path = {"best": self.best, "last": self.last}.get(which, Path(which))
        if not path.exists():
            if which == "best" and self.last.exists():
                return self.last
            raise RunError(f"{self.root}: checkpoint {path} does not exist (has the run finished an epoch?)")
        return path


def open_run(path: str | Path) -> RunDir:
    """An existing run folder (for export/report); errors say what is missing."""
    run = RunDir(Path(path))
    if not run.root.is_dir():
        raise RunError(f"{run.root}: run folder does not exist")
    if not run.config.exists():
        raise RunError(f"{run.root}: not a segcalib run folder (no {CONFIG_NAME})")
    return run


def config_mismatch(saved: dict[str, Any], current: dict[str, Any], ignore: Sequence[str] = ("train.epochs",)) -> list[str]:
    """Dotted keys whose values differ between two config dicts (``ignore``d keys left out)."""
    changed: set[str] = set()

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in set(a) | set(b):
                walk(a.get(key), b.get(key), f"{prefix}{key}.")
        elif a != b and prefix.rstrip(".") not in ignore:
            changed.add(prefix.rstrip("."))

    walk(saved, current, "")
    return sorted(changed)


def check_run_config(
    run: RunDir,
    current: dict[str, Any],
    action: str,
    complete_saved: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> None:
    """Refuse to ``action`` (resume, reuse) a run folder whose own ``config.yaml`` differs from
    ``current`` in anything but ``train.epochs``. The config is written when the folder is made,
    so the check holds from the first moment of a run, before any checkpoint exists.
    ``complete_saved`` fills in the keys a newer schema added (their defaults), so that a run
    written by an older segcalib is not "another config" for keys it could not have had."""
    if not run.config.exists():
        return
    try:
        saved = yaml.safe_load(run.config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RunError(f"{run.config}: unreadable run config ({exc}); remove the run folder or choose another") from None
    if not isinstance(saved, dict):
        raise RunError(f"{run.config}: not a run config; remove the run folder or choose another")
    changed = config_mismatch(complete_saved(saved) if complete_saved else saved, current)
    if changed:
        raise RunError(
            f"{run.root}: cannot {action} a run of another config (changed: {', '.join(changed)}); only "
            "train.epochs may change. Choose another run folder or remove this one"
        )
