"""``segcalib train``."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("train", help="(arrives with its issue)")
