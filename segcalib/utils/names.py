"""Registries by name, and one way to say that a name is unknown.

Losses, models, metrics, regions, calibrators and prediction formats are each a :class:`Registry`:
``register`` adds a name (twice is a bug), ``lookup`` returns what it names or raises
:class:`UnknownNameError` (a :class:`~segcalib.errors.ConfigError`: exit 2) worded the same way
everywhere, with the closest valid names as a suggestion (``difflib``)::

    unknown calibrator 'vectr'; did you mean 'vector'? valid calibrators: dirichlet, ..., vector

Unknown parameters and keys use the same wording (:func:`unknown_name_message`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import TypeVar

from segcalib.errors import ConfigError

_V = TypeVar("_V")


class UnknownNameError(ConfigError, KeyError):
    """A name that is not in a registry (or a parameter / key that does not exist)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def plural(kind: str) -> str:
    if kind.endswith("s"):
        return kind + "es"
    return kind[:-1] + "ies" if kind.endswith("y") and not kind.endswith("ey") else kind + "s"


def suggestion(name: object, valid: Iterable[str]) -> str | None:
    """The valid name closest to ``name`` (difflib), or None when none is close."""
    if not isinstance(name, str):
        return None
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    if not close:  # a different case or separator: 'Dice', 'focal-adaptive'
        folded = {v.lower().replace("-", "_"): v for v in valid}
        key = name.lower().replace("-", "_")
        return folded.get(key)
    return close[0]


def unknown_name_message(kind: str, name: object, valid: Iterable[str], owner: str = "") -> str:
    """``unknown <kind> 'x'[ of <owner>]; did you mean 'y'? valid <kinds>: a, b, c`` (the hint only
    when a valid name is close); ``valid`` is listed in the order given."""
    valid = list(valid)
    close = suggestion(name, valid)
    hint = f"; did you mean {close!r}?" if close is not None and close != name else ";"
    of = f" of {owner}" if owner else ""
    return f"unknown {kind} {name!r}{of}{hint} valid {plural(kind)}: {', '.join(valid) or 'none'}"


class Registry(dict[str, _V]):
    """Names of one kind (``"loss"``, ``"region"`` ...) and what they name, in registration order
    (a dict, so that tests may add an entry for a while with ``monkeypatch.setitem``)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, name: str, value: _V) -> _V:
        """Add ``name``; a name registered twice is a programming error (ValueError)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self:
            raise ValueError(f"{self.kind} name {name!r} is already registered by {self[name]!r}")
        self[name] = value
        return value

    def lookup(self, name: object, where: str = "") -> _V:
        """What ``name`` names; :class:`UnknownNameError` otherwise (``where``: the option or key,
        put before the message)."""
        try:
            return self[name]  # type: ignore[index]
        except (KeyError, TypeError):
            prefix = f"{where}: " if where else ""
            raise UnknownNameError(prefix + unknown_name_message(self.kind, name, sorted(self))) from None

    def check(self, name: object, where: str = "") -> str:
        """``name`` itself when registered (UnknownNameError otherwise)."""
        self.lookup(name, where)
        return name  # type: ignore[return-value]

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self)
