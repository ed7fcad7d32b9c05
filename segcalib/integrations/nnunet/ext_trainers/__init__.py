"""The folder that ``nnUNet_extTrainer`` points at: nnU-Net imports its one module by file name."""
