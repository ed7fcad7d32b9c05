"""``segcalib nnunet env``: the shell line that lets nnU-Net v2 find segcalib's trainers.

nnU-Net (>= 2.8) imports trainers from the folders in ``nnUNet_extTrainer``; this prints the
``export`` line for the folder inside the installed segcalib (``--path``: the folder alone, for
``export nnUNet_extTrainer=$(segcalib nnunet env --path)``). Imports happen in the run function,
so ``segcalib --help`` stays fast.
"""

from __future__ import annotations

import argparse

HELP = "nnU-Net v2 integration: train nnU-Net with segcalib's losses"


def add_parser(sub: argparse._SubParsersAction) -> None:
    nnunet = sub.add_parser("nnunet", help=HELP)
    nnunet_sub = nnunet.add_subparsers(dest="nnunet_command", metavar="ACTION", required=True)
    env = nnunet_sub.add_parser(
        "env", help="print the `export nnUNet_extTrainer=...` line for segcalib's nnU-Net trainers"
    )
    env.add_argument("--path", action="store_true", help="print only the folder (for $(...) in a shell)")
    env.set_defaults(func=run_env)


def run_env(args: argparse.Namespace) -> int:
    import importlib.util
    import shlex

    from segcalib.errors import ConfigError
    from segcalib.integrations.nnunet import LOSS_ENV, PARAMS_ENV, TRAINER_LOSSES, trainer_folder

    if importlib.util.find_spec("nnunetv2") is None:
        raise ConfigError("nnunetv2 is not installed; install it with: pip install 'segcalib[nnunet]'")
    folder = str(trainer_folder())
    if args.path:
        print(folder)
        return 0
    print(f"export nnUNet_extTrainer={shlex.quote(folder)}")
    print(f"# then: nnUNetv2_train DATASET CONFIG FOLD -tr {next(iter(TRAINER_LOSSES))} --npz "
          f"(trainers: {', '.join(TRAINER_LOSSES)}; nnUNetTrainerSegcalib reads {LOSS_ENV} and {PARAMS_ENV}); "
          "keep nnUNet_extTrainer set for nnUNetv2_predict: it imports the trainer again")
    return 0
