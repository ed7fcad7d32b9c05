"""A picklable unit for the process-pool test of ``pipelines.study.run.run_all``."""

from __future__ import annotations

import logging


def say(word: str, threads: int | None = None) -> str:
    logging.getLogger("segcalib.study").info("unit says %s", word)
    return word
