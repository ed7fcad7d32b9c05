"""The ``segcalib`` command: ``data check``, ``train``, ``export``, ``calibrate``, ``evaluate``, ``report``,
``nnunet``, ``demo``.

Exit codes: 0 success; 2 bad input or configuration (one clear message, no traceback unless
``--debug``); 1 a bug (with its traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Sequence

from segcalib import __version__
from segcalib.errors import SegcalibError

EXIT_OK, EXIT_BUG, EXIT_USER = 0, 1, 2
_COMMANDS = ("data", "train", "export", "calibrate", "evaluate", "report", "nnunet", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segcalib",
        description="Train segmentation networks that know how sure they are; export calibrated "
        "probability maps; evaluate and report their calibration.",
    )
    parser.add_argument("--version", action="version", version=f"segcalib {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    import importlib

    for name in _COMMANDS:
        importlib.import_module(f"segcalib.cli.{name}_cmd").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        parser = build_parser()
        args = parser.parse_args(args_list)
        return int(args.func(args) or EXIT_OK)
    except SegcalibError as exc:
        if debug:
            traceback.print_exc()
        print(f"segcalib: error: {exc}", file=sys.stderr)
        return EXIT_USER
    except RuntimeError as exc:
        if not _is_gpu_out_of_memory(exc):
            raise
        if debug:
            traceback.print_exc()
        print(
            "segcalib: error: the GPU ran out of memory; lower train.batch_size or data.patch_size (training) or "
            f"inference.sw_batch_size / inference.roi_size (inference), or run with --device cpu ({str(exc).splitlines()[0]})",
            file=sys.stderr,
        )
        return EXIT_USER
    except KeyboardInterrupt:
        print("segcalib: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # argparse: 2 for usage errors, 0 for --help
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USER


def _is_gpu_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)
