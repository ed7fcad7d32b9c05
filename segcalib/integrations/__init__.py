"""Bridges to other frameworks (nnU-Net v2). Nothing in segcalib imports them but the CLI; each
needs its framework installed as an optional extra (``pip install 'segcalib[nnunet]'``)."""
