"""The ``segcalib`` command: ``data check``, ``train``, ``export``, ``calibrate``, ``conformal``, ``evaluate``,
``report``, ``nnunet``, ``demo``.

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
from segcalib.utils.progress import close_open_bars

EXIT_OK, EXIT_BUG, EXIT_USER = 0, 1, 2
_COMMANDS = ("data", "train", "export", "calibrate", "conformal", "evaluate", "report", "nnunet", "demo")


class _Parser(argparse.ArgumentParser):
    """argparse, with the registries' "did you mean" for a mistyped choice (commands, methods, regions)."""

    def _check_value(self, action: argparse.Action, value: object) -> None:
        if action.choices is not None and value not in action.choices:
            from segcalib.utils.names import suggestion

            close = suggestion(value, [str(c) for c in action.choices])
            if close is not None:
                raise argparse.ArgumentError(action, f"invalid choice: {value!r}; did you mean {close!r}? (choose "
                                                     f"from {', '.join(map(repr, action.choices))})")
        super()._check_value(action, value)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``segcalib`` parser. With ``argv``, only the command it names gets its options (the other
    commands are listed with their one-line help): building a command's options imports the
    registries its choices come from (torch, MONAI), which ``--help``, ``--version`` and a
    mistyped command must not wait for. Without ``argv``, every command is complete."""
    parser = _Parser(
        prog="segcalib",
        description="Train segmentation networks that know how sure they are; export calibrated "
        "probability maps; evaluate and report their calibration.",
    )
    parser.add_argument("--version", action="version", version=f"segcalib {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    import importlib

    chosen = None if argv is None else next((a for a in argv if not a.startswith("-")), "")
    for name in _COMMANDS:
        module = importlib.import_module(f"segcalib.cli.{name}_cmd")  # cheap: heavy imports are inside
        if chosen is None or chosen == name:
            module.add_parser(sub)
        else:
            sub.add_parser(name, help=module.HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        parser = build_parser(args_list)
        args = parser.parse_args(args_list)
        return int(args.func(args) or EXIT_OK)
    except SegcalibError as exc:
        _end_progress_lines()
        if debug:
            traceback.print_exc()
        print(f"segcalib: error: {exc}", file=sys.stderr)
        return EXIT_USER
    except RuntimeError as exc:
        if not _is_gpu_out_of_memory(exc):
            raise
        _end_progress_lines()
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


def _end_progress_lines() -> None:
    """Close any progress bar the failed command left open: the message gets a line of its own."""
    close_open_bars()
    sys.stdout.flush()


def _is_gpu_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)
