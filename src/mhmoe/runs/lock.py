"""One writer per run folder: an OS-level lock (``fcntl.flock``) on ``RUN_DIR/.mhmoe.lock``.

Why: two trainers on one ``--out`` overwrote each other's config.json, and the second one's
resume cleanup deleted the first one's checkpoint in progress as a "leftover" (issue 16). The
trainer, and every other command that writes into a run or export folder, holds this lock while
it writes; a second one is refused at once with one line naming the holder's pid
(``RunLockedError``, a ``ValueError``: exit status 2).

The kernel releases a ``flock`` when the process that holds it dies, however it dies, so a
SIGKILLed trainer leaves no stale lock: the lock file stays (it holds only the last holder's pid
and host, for the message) but locks nothing. Locks are reentrant within a process (``train``
locks the folder, and ``train_loop`` called from it does again), counted per folder.

On file systems without ``flock`` support (some network mounts return ENOLCK/EOPNOTSUPP) the
lock cannot be taken; the command then refuses to run rather than run unprotected, naming the
file system problem (an ``OSError``: exit status 1).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".mhmoe.lock"

# folder (resolved) -> [fd, depth]: the locks this process holds.
_held: dict[Path, list[int]] = {}


class RunLockedError(ValueError):
    """Another process holds the folder's lock (the message names its pid)."""


def _holder(path: Path) -> str:
    """What the lock file says about its holder ("pid 123 on host")."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return text or "an unknown process"


def acquire(folder: Path, what: str = "a trainer") -> None:
    """Take the lock of ``folder`` (created if needed) or raise ``RunLockedError`` at once."""
    folder = Path(folder).resolve()
    if folder in _held:
        _held[folder][1] += 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies, like any file of the run
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunLockedError(
                f"{folder}: in use by {_holder(path)} (lock {path}); one process at a time writes a "
                "run folder: wait for it to finish or stop it, or choose another folder"
            ) from None
        raise OSError(err.errno, f"{path}: cannot lock the folder ({err.strerror}); the file system may "
                                 "not support flock") from None
    # Who holds it, for the message a second process prints (written under the lock).
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({what})\n".encode(), 0)
    _held[folder] = [fd, 1]


def release(folder: Path) -> None:
    """Undo one ``acquire`` of ``folder``; the lock goes when the outermost one is undone."""
    folder = Path(folder).resolve()
    entry = _held.get(folder)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[folder]
    try:
        fcntl.flock(entry[0], fcntl.LOCK_UN)
    finally:
        os.close(entry[0])


def is_held(folder: Path) -> bool:
    """Whether this process holds the lock of ``folder``."""
    return Path(folder).resolve() in _held


@contextlib.contextmanager
def locked(folder: Path, what: str = "a trainer") -> Iterator[None]:
    """Hold the lock of ``folder`` for the ``with`` block."""
    acquire(folder, what)
    try:
        yield
    finally:
        release(folder)
