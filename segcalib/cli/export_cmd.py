"""``segcalib export``."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("export", help="(arrives with its issue)")
