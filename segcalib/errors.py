"""Errors caused by what the user gave us (files, configs, arguments).

The command line turns every :class:`SegcalibError` into one clear message and exit code 2;
anything else is a bug (exit code 1).
"""

from __future__ import annotations


class SegcalibError(Exception):
    """Bad input from the user: the message names the file, key or case and the problem."""


class DataError(SegcalibError, ValueError):
    """A manifest, a volume or a prediction file that cannot be used."""


class ConfigError(SegcalibError, ValueError):
    """A configuration key with a wrong value, an unknown key or an unknown name."""


class RunError(SegcalibError):
    """A run folder that is missing, incomplete or would be overwritten."""


class ResourceError(SegcalibError):
    """The machine ran out of something the user can free (disk space, GPU memory)."""
