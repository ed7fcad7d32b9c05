"""What nnU-Net imports when ``nnUNet_extTrainer`` points at this folder.

nnU-Net imports the modules of that folder as top-level modules and looks the trainer up by class
name; this module only re-exports segcalib's trainers, so the classes nnU-Net gets are those of
:mod:`segcalib.integrations.nnunet.trainers` (one definition, whatever the import path).
"""

from segcalib.integrations.nnunet.trainers import *  # noqa: F401,F403
from segcalib.integrations.nnunet.trainers import __all__  # noqa: F401
