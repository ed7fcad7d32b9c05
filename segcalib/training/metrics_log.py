"""Per-epoch training log: ``metrics.csv`` (rewritten atomically each epoch) and TensorBoard."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from segcalib.utils.files import write_text_atomic


class MetricsLog:
    """Rows of per-epoch values; a row is never half-written and resume drops later epochs."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self._tb_dir = tensorboard_dir
        self._writer = None

    def load(self, up_to_epoch: int) -> None:
        """Read the existing rows of epochs ``<= up_to_epoch`` (for ``--resume``)."""
        if not self.path.exists():
            return
        with self.path.open(newline="") as fh:
            self.rows = [_parse_row(r) for r in csv.DictReader(fh) if int(r["epoch"]) <= up_to_epoch]

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._write_csv()
        writer = self._tensorboard()
        if writer is not None:
            epoch = int(row["epoch"])
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    writer.add_scalar(key.replace("val_", "val/").replace("train_", "train/"), value, epoch)
            writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write_csv(self) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns.extend(k for k in row if k not in columns)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: _format(v) for k, v in row.items()})
        write_text_atomic(self.path, buffer.getvalue())

    def _tensorboard(self):
        if self._tb_dir is None:
            return None
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but logging must never stop training
                self._tb_dir = None
                return None
            self._writer = SummaryWriter(log_dir=str(self._tb_dir))
        return self._writer


def _format(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def _parse_row(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        if value == "":
            continue
        try:
            out[key] = int(value) if key == "epoch" else float(value)
        except ValueError:
            out[key] = value
    return out
