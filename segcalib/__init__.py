"""segcalib: train segmentation networks that know how sure they are.

Data flow: ``data -> models -> losses -> training -> inference -> export -> metrics -> reports``;
``segcalib.cli`` exposes the steps as commands.
"""

__version__ = "0.1.0"
