"""Per-epoch training log: ``metrics.csv`` (rewritten atomically each epoch) and TensorBoard.

TensorBoard's writer reports a full disk or an unwritable folder as a bare ``OSError`` (from
its constructor, or from a later write or flush by its background thread); these become a
:class:`ResourceError` / :class:`RunError` naming the events folder (exit code 2).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import math
import threading
from pathlib import Path
from typing import Any

from segcalib.errors import ResourceError, RunError
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
            with self._events_errors():
                for key, value in row.items():
                    if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                        writer.add_scalar(key.replace("val_", "val/").replace("train_", "train/"), value, epoch)
                writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with self._events_errors():
                writer.close()

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
            _quiet_writer_threads()
            with self._events_errors():
                self._writer = SummaryWriter(log_dir=str(self._tb_dir))
        return self._writer

    @contextlib.contextmanager
    def _events_errors(self):
        """TensorBoard's ``OSError`` as an error naming the events folder."""
        try:
            yield
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            if exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc):
                raise ResourceError(
                    f"{self._tb_dir}: no space left on the device for the TensorBoard events ({reason}); "
                    "the checkpoints of finished epochs are intact: free some space and continue with --resume"
                ) from exc
            raise RunError(f"{self._tb_dir}: cannot write the TensorBoard events ({reason})") from exc


def _quiet_writer_threads() -> None:
    """TensorBoard's writer thread prints the traceback of a failed write, then hands the error
    to the main thread's next write or flush, which names it: print nothing for it here."""
    previous = threading.excepthook
    if getattr(previous, "segcalib_quiet", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
            return
        previous(args)

    hook.segcalib_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


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
