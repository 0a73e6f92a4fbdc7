"""Writing files so that a kill, a crash or a full disk never leaves a half-written one.

`atomic_write` is the one way the package writes a file it may later read back: the bytes go to a
hidden temporary file beside the target, are flushed (and fsynced when asked), then renamed over
the target. A rename within a folder is atomic, so readers see the old file or the new one, never
a mix; the temporary file is removed when anything fails.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Callable


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def atomic_write(path: Path, write: Callable[[IO], None], text: bool = False, fsync: bool = False) -> Path:
    """Call `write(file)` on a temporary file, then rename it to `path`; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        with open(temporary, "w" if text else "wb") as file:
            write(file)
            file.flush()
            if fsync:
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_directory(path.parent)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda file: file.write(text), text=True)


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable; a no-op where folders can't be opened (some file systems)."""
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
