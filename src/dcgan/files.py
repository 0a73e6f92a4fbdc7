"""Writing files so that a kill, a crash or a full disk never leaves a half-written one.

`atomic_write` is the one way the package writes a file it may later read back: the bytes go to a
hidden temporary file beside the target, are flushed (and fsynced when asked), then renamed over
the target. A rename within a folder is atomic, so readers see the old file or the new one, never
a mix; the temporary file is removed when anything fails. `atomic_create` is the same for writers
that want a file name rather than an open file (numpy's memmap, TorchScript, ONNX).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator, Optional

from dcgan.errors import UserError


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def atomic_write(
    path: Path, write: Callable[[IO], None], text: bool = False, fsync: bool = False, also_as: Optional[Path] = None
) -> Path:
    """Call `write(file)` on a temporary file, then rename it to `path`; returns `path`.

    `fsync` makes the bytes and the rename durable before returning (checkpoints). `also_as` gives the
    same bytes a second name before the rename (a hard link, or a copy where the file system has no
    links), and the temporary file is named after it: `.step_000010.pt.tmp` for checkpoint.save.
    """

    def write_file(temporary: Path) -> None:
        with open(temporary, "w" if text else "wb") as file:
            write(file)
            file.flush()
            if fsync:
                os.fsync(file.fileno())

    path = Path(path)
    return _rename_into_place(path, temporary_path(also_as or path), write_file, also_as, fsync)


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda file: file.write(text), text=True)


def atomic_create(path: Path, create: Callable[[Path], None], unique: bool = False) -> Path:
    """Call `create(temporary)` to write the file under a temporary name, then rename it to `path`.

    `unique`: a temporary name of this call's own, for a file that several processes may write at
    once (the data cache); the others keep one name per target, which a later write replaces.
    """
    path = Path(path)
    if not unique:
        return _rename_into_place(path, temporary_path(path), create)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    return _rename_into_place(path, Path(name), create)


def _rename_into_place(
    path: Path, temporary: Path, create: Callable[[Path], None], also_as: Optional[Path] = None, fsync: bool = False
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        create(temporary)
        if also_as is not None:
            also_as.unlink(missing_ok=True)
            try:
                os.link(temporary, also_as)
            except OSError:  # file systems without hard links
                shutil.copyfile(temporary, also_as)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if error.filename is None:  # a write() that failed (a full disk) names no file: name the one being written
            raise OSError(error.errno, error.strerror or str(error), str(path)) from None
        raise
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_directory(path.parent)
    return path


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


def not_written(path: Path | str, reason: str, advice: str, what: str = "") -> UserError:
    """One line naming the file (`what`: e.g. "checkpoint ") that could not be written, why, the space left on
    its disk, and what to do."""
    try:
        free = f"{shutil.disk_usage(Path(path).parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    return UserError(f"could not write {what}{path} ({reason}; {free}); {advice}")


@contextmanager
def write_errors_as_user_errors(advice: str) -> Iterator[None]:
    """A command's writes: an OSError (a full disk, a file over the size limit, a vanished or read-only folder)
    becomes one line naming the path, with `advice`; the atomic writers have removed their temporary files."""
    try:
        yield
    except OSError as error:
        raise not_written(error.filename or "an output file", error.strerror or str(error), advice) from None
