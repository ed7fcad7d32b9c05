"""Progress bars that cost nothing when off (quiet logs, non-zero ranks), and that never leave a
half line behind for the next message.

On a terminal: a tqdm bar, cleared when it closes. Elsewhere (a log file, a pipe, CI): whole lines
only (``export: 3/10``, at most every 30 s), since the carriage returns of a bar
would glue the next line (an error, a summary) to it. :func:`close_open_bars` ends the bars still
open, so that an error message starts on a line of its own.
"""

from __future__ import annotations

import sys
import time
import weakref
from typing import Any

_OPEN: "weakref.WeakSet[Any]" = weakref.WeakSet()
LINE_INTERVAL_S = 30.0


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass


class _LineBar:
    """``desc: k/total`` on a line of its own, at most every :data:`LINE_INTERVAL_S` seconds."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n = total, desc, 0
        self._last = time.monotonic()
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= LINE_INTERVAL_S:
            self._print()

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _OPEN.discard(self)

    def _print(self) -> None:
        self._last = time.monotonic()
        print(f"{self.desc}: {self.n}/{self.total}", file=sys.stderr, flush=True)


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(total: int, desc: str, enabled: bool = True) -> Any:
    """A bar of ``total`` steps with ``update`` / ``set_description`` / ``close`` (a tqdm bar on a
    terminal, whole lines elsewhere, nothing when not ``enabled``)."""
    if not enabled:
        return _NoBar()
    if not _is_terminal():
        bar: Any = _LineBar(total, desc)
    else:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0)
    _OPEN.add(bar)
    return bar


def close_open_bars() -> None:
    """Close every bar still open (a command that fails midway), clearing a terminal bar's line."""
    for bar in list(_OPEN):
        try:
            bar.close()
        except Exception:  # a bar that cannot close must not hide the error being reported
            pass
        _OPEN.discard(bar)
