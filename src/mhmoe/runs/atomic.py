"""Atomic file writes: a reader sees either the old complete file or the new complete file.

The recipe: write to a uniquely named temporary file in the destination folder (same file
system, so the final rename is atomic), flush and fsync it, ``os.replace`` it over the
destination, then fsync the folder so the rename itself survives a crash. Temporary files are
hidden (leading dot) and removed on any error.

Permissions: ``tempfile.mkstemp`` creates its file 0600 whatever the umask, so every file
written this way (checkpoints, config.json, results, plots, exports) was unreadable to the
colleagues a plain ``open()`` would have let read it on a shared file system (issue 16). The
temporary file is therefore given the mode ``open()`` would give a new file, ``0o666`` minus
the process umask (0644 under the usual 022), before it is renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def _umask() -> int:
    """The process umask. Linux reports it in /proc (read-only, safe with threads); elsewhere
    it can only be read by setting it and putting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 minus the umask."""
    return 0o666 & ~_umask()


def fsync_directory(directory: Path) -> None:
    """Make a completed rename durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_binary_writer(destination: Path) -> Iterator[BinaryIO]:
    """Yield a binary file object; on clean exit its content replaces ``destination`` atomically."""
    destination = Path(destination)
    fd, temp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
    temp_path = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), default_file_mode())  # mkstemp's 0600 -> open()'s (docstring)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, destination)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    fsync_directory(destination.parent)


def atomic_write_text(destination: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``destination`` atomically."""
    atomic_write_bytes(destination, text.encode("utf-8"))


def atomic_write_bytes(destination: Path, data: bytes) -> None:
    """Write ``data`` to ``destination`` atomically."""
    with atomic_binary_writer(destination) as handle:
        handle.write(data)


def atomic_write_json(destination: Path, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON to ``destination`` atomically."""
    atomic_write_text(destination, json.dumps(data, indent=2, sort_keys=True) + "\n")
