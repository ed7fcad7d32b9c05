"""Atomic file writes: a reader never sees a half-written file.

Everything segcalib writes (configs, checkpoints, CSV logs, NIfTI maps, reports) goes to a
temporary name in the destination folder and is renamed over the final name once complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from segcalib.errors import ResourceError, RunError

# what atomic_path's mkstemp names look like: ".<stem>.<8 random characters>.tmp<suffixes>"
_TEMPORARY = re.compile(r"^\.[^/]*\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9.]+)?$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    ``suffix`` keeps the extension that a writer looks at (e.g. ``.nii.gz``); by default the
    final name's suffixes are kept. On failure the temporary file is removed and ``path`` is
    left as it was. Out-of-space errors become :class:`ResourceError` (exit code 2).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are shared like any new file
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceError(f"no space left on the device while writing {path}; earlier files are intact") from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_with(path: str | os.PathLike, writer: Callable[[Path], None], suffix: str | None = None) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path, suffix=suffix) as tmp:
        writer(tmp)


def check_output_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Refuse, before any work, an output folder that cannot be one; return it as a Path.

    ``path`` must not be a file nor lie under one, and the folder (or, if it does not exist yet,
    its nearest existing parent, where it will be made) must be writable: not on a read-only
    file system, not without write permission. ``what`` names it for the user (``--output``).
    """
    path = Path(path)
    existing = None
    for folder in [path, *path.parents]:
        if folder.exists() and not folder.is_dir():
            raise RunError(f"{what} {path}: {folder} exists and is not a folder; choose another {what}")
        if existing is None and folder.is_dir():
            existing = folder
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        reason = "a read-only file system" if _read_only(existing) else "no write permission"
        state = "" if existing == path else f" (it would be made in {existing})"
        raise RunError(f"{what} {path}: cannot write there{state}: {reason}; choose another {what}")
    return path


def is_temporary(path: str | os.PathLike) -> bool:
    """True for a name that :func:`atomic_path` gives its temporary files."""
    return bool(_TEMPORARY.match(Path(path).name))


def remove_stale_temporaries(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Remove the hidden temporary files that a killed run left in ``folder``; return them.

    Call it only while holding the folder's lock (:mod:`segcalib.utils.locks`), once the
    folder is complete: a temporary file of a live writer would be removed too.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = folder.rglob(".*") if recursive else folder.glob(".*")
    removed = []
    for path in candidates:
        if path.is_file() and not path.is_symlink() and is_temporary(path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return sorted(removed)


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
