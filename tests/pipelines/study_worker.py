"""A picklable unit for the process-pool tests of ``pipelines.study.run.UnitPool``."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path


def say(word: str, seconds: float, folder: str, threads: int | None = None) -> str:
    """Log ``word``, take ``seconds``, and leave in ``folder`` the files ``<word>.pid`` and
    ``<word>.start`` / ``<word>.end`` (times)."""
    (Path(folder) / f"{word}.pid").write_text(str(os.getpid()))
    (Path(folder) / f"{word}.start").write_text(repr(time.time()))
    logging.getLogger("segcalib.study").info("unit says %s", word)
    time.sleep(seconds)
    (Path(folder) / f"{word}.end").write_text(repr(time.time()))
    return word
