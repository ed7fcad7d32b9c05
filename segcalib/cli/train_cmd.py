"""``segcalib train --config CFG [--run-dir DIR] [--resume] [--set key=value ...]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from segcalib.errors import ConfigError

HELP = "train a network with a calibration loss (runs under torchrun for several GPUs/nodes)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help=HELP,
        description="Train one experiment. Writes RUN_DIR (default runs/<name>/): config.yaml, "
        "checkpoints/last.pt and best.pt, metrics.csv, TensorBoard events.",
    )
    p.add_argument("--config", help="experiment YAML (default with --resume: RUN_DIR/config.yaml)")
    p.add_argument("--run-dir", help="run folder (default: runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from checkpoints/last.pt")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set loss.name=mbls --set train.epochs=50")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segcalib.config import load_config
    from segcalib.runs.run_dir import RunDir
    from segcalib.training import train
    from segcalib.utils.distributed import init_from_env, is_main_process, shutdown
    from segcalib.utils.files import remove_stale_temporaries
    from segcalib.utils.locks import folder_lock

    config_path = args.config
    if config_path is None:
        if not (args.resume and args.run_dir):
            raise ConfigError("train: give --config CFG (or --run-dir DIR --resume to continue a run)")
        config_path = str(Path(args.run_dir) / "config.yaml")
    cfg = load_config(config_path, args.overrides)
    run_dir = RunDir(Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name)
    what = "--run-dir" if args.run_dir else "run folder"
    with folder_lock(run_dir.root, command=f"train --run-dir {run_dir.root}", what=what):
        init_from_env()
        try:
            summary = train(cfg, run_dir, resume=args.resume, progress=not args.no_progress)
            main_process = is_main_process()
        except ConfigError as exc:  # a loss/model parameter the registries refuse when building
            raise ConfigError(_naming(config_path, exc)) from None
        finally:
            shutdown()
        if main_process:
            remove_stale_temporaries(run_dir.root, recursive=True)  # left by a killed run (checkpoints too)
    if main_process:
        print(f"run folder: {summary.run_dir.root}  (best epoch {summary.best_epoch}, checkpoints/best.pt)")
    return 0


def _naming(config_path: str, exc: ConfigError) -> str:
    """The message of ``exc`` with the config file in front (once)."""
    message = str(exc)
    return message if message.startswith(str(config_path)) else f"{config_path}: {message}"
