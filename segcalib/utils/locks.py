"""One writer per output folder: an exclusive OS-level lock held for a command's whole run.

Two commands writing the same folder at once would mix their files (maps with two temperatures,
an ``export.json`` describing only one). Every command that writes a folder holds
:func:`folder_lock` on it: ``fcntl.flock`` on ``<folder>/.segcalib.lock``, taken without
waiting. The kernel drops the lock when the process ends, however it ends, so a ``kill -9``
leaves no stale lock (at most a stale lock *file*, which the next command simply locks again).
The file records who holds it (pid, command, start time, host) so that the refused command can
name the other process. Under ``torchrun`` only rank 0 writes, so only rank 0 locks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from segcalib.errors import RunError
from segcalib.utils.files import check_output_folder

LOCK_NAME = ".segcalib.lock"


def is_lock_file(path: str | os.PathLike) -> bool:
    """True for the lock file itself (checks such as "the folder is empty" must ignore it)."""
    return Path(path).name == LOCK_NAME


def folder_entries(folder: str | os.PathLike) -> list[Path]:
    """The entries of ``folder`` other than the lock file (empty if the folder does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if not is_lock_file(p)]


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str, what: str = "output folder") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if needed) for the block; yield the folder.

    Raises :class:`RunError` naming the folder and the holder (pid, command, start time) when
    another process holds it, or when ``folder`` cannot be an output folder (``what`` names it:
    :func:`~segcalib.utils.files.check_output_folder`). On exit the lock
    file is removed, and so are the folders this call created if they are still empty.
    """
    folder = Path(folder)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 writes, and locks, for everyone
        yield folder
        return
    created = _make_folder(folder, what)
    try:
        fd = _acquire(folder, command)
    except BaseException:
        _remove_empty(created)
        raise
    path = folder / LOCK_NAME
    try:
        yield folder
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked, so a waiting opener sees a new file (see _acquire)
        os.close(fd)
        _remove_empty(created)


def lock_holder(folder: str | os.PathLike) -> dict:
    """What the lock file of ``folder`` says about its holder (``{}`` if nothing readable)."""
    try:
        record = json.loads((Path(folder) / LOCK_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


# -- internals ---------------------------------------------------------------------------------


def _make_folder(folder: Path, what: str) -> list[Path]:
    """Create ``folder`` and missing parents; return the ones created (deepest last)."""
    check_output_folder(folder, what)
    missing = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"{folder}: cannot create the folder ({exc.strerror})") from None
    return missing


def _acquire(folder: Path, command: str) -> int:
    path = folder / LOCK_NAME
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunError(f"{folder}: cannot write in this folder ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunError(f"{folder}: cannot lock {path} ({exc.strerror})") from None
            raise RunError(_busy_message(folder)) from None
        # The holder may have removed the file between our open and flock: then we locked an
        # unlinked file that nobody else will see. Lock the file that is there instead.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            continue
        mine = os.fstat(fd)
        if (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
            os.close(fd)
            continue
        record = {"pid": os.getpid(), "command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "host": socket.gethostname()}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(record).encode("utf-8"))
        return fd
    raise RunError(f"{folder}: could not take the lock {path} (it keeps being replaced)")


def _busy_message(folder: Path) -> str:
    holder = {}
    for _ in range(20):  # the holder writes its record right after locking
        holder = lock_holder(folder)
        if holder:
            break
        time.sleep(0.01)
    who = (
        f"pid {holder.get('pid')} on {holder.get('host')}, `segcalib {holder.get('command')}` "
        f"started {holder.get('started')}"
        if holder
        else "another process"
    )
    return (
        f"{folder}: in use by another segcalib command ({who}); wait for it to finish "
        "or choose another output folder"
    )


def _remove_empty(created: list[Path]) -> None:
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            return
