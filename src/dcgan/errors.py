"""What the user is told: the one exception type for their mistakes, the exit codes, and the checks that raise it.

Every user-facing problem (a bad setting, missing data, an unreadable checkpoint, an unwritable path)
is raised as `UserError`; the command-line entry points (cli.py) turn it into one line on stderr and
USAGE_EXIT. Tracebacks are for bugs. This module imports nothing from the package, so any module may use it.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# gan-train's exit codes: 0 finished, USAGE_EXIT a usage problem, DIVERGED_EXIT training diverged,
# 128 + N stopped by signal N (130 for SIGINT, 143 for SIGTERM), as shells report it.
USAGE_EXIT = 2
DIVERGED_EXIT = 3


def signal_exit(signum: int) -> int:
    return 128 + signum


# Ctrl-C, `kill` and a closed terminal or SLURM session: each stops a command cleanly (README, exit codes).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
SAME_SIGNAL_S = 1.0  # a signal this soon after another is the same request delivered twice (terminal + parent)


class Interrupted(BaseException):
    """A stop signal where nothing is left to save (start-up, scoring, a second Ctrl-C during training):
    the command ends with one line and exit 128 + N. Every file it writes is written whole (files.py), so
    nothing is half-written. A BaseException, like KeyboardInterrupt, so no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signal = signum


class SignalsRaise:
    """Install as the stop signals' handler: each raises Interrupted, but a repeat within SAME_SIGNAL_S is dropped."""

    def __init__(self) -> None:
        self.last = -float("inf")

    def __call__(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        repeat, self.last = now - self.last < SAME_SIGNAL_S, now
        if not repeat:
            raise Interrupted(signum)


def raise_on_stop_signals() -> dict:
    """Every stop signal raises Interrupted from here on; returns the handlers it replaced."""
    handler = SignalsRaise()
    return {s: signal.signal(s, handler) for s in STOP_SIGNALS}


def restore_signals(handlers: dict) -> None:
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def interrupted_exit(interrupted: Interrupted, program: str, what: str = "") -> None:
    print(f"{program}: {interrupted}{what}", file=sys.stderr, flush=True)
    sys.exit(signal_exit(interrupted.signal))


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint): reported without a traceback."""


def exit_with(error: UserError, program: str) -> None:
    # One line, whatever the message holds: scripts and people read the first line of stderr.
    message = " ".join(line.strip() for line in str(error).splitlines())
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(USAGE_EXIT)


def one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        options = ", ".join(str(a) for a in allowed)
        raise UserError(f"{key} must be one of {options}; got {value!r}")


def at_least(key: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise UserError(f"{key} must be >= {minimum}, got {value}")


def finite(key: str, value: float) -> None:
    """NaN passes every `not x < bound` test and inf every `x > 0` one: checked first, with its own line."""
    if not math.isfinite(value):
        raise UserError(f"{key} must be a finite number, got {value}")


def at_most(key: str, value: float, maximum: float, cost: str) -> None:
    """A size a typo can make huge is bounded; `cost` says what the value would take (memory, time, files)."""
    if value > maximum:
        raise UserError(f"{key}={value:,} is more than the {maximum:,} allowed: {cost}")


def unused(key: str, value: Any, why: str, fix: str) -> None:
    """A value that would have no effect is refused rather than silently ignored: `why` it does nothing, `fix`."""
    raise UserError(f"{key}={value} would have no effect: {why}; {fix}")


# The seeds torch.manual_seed and torch.Generator.manual_seed take: any 64-bit integer, signed or unsigned.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def check_seeds(key: str, first: int, last: int) -> None:
    """Seeds `first`..`last` (inclusive) are all ones torch can seed with."""
    if first < SEED_MIN or last > SEED_MAX:
        uses = f"seeds {first}..{last}" if last != first else f"seed {first}"
        raise UserError(
            f"{key} uses {uses}, beyond the 64-bit seeds torch takes ({SEED_MIN}..{SEED_MAX}); use smaller "
            f"seeds, e.g. {key}=0"
        )


def check_output_file(key: str, path: Path, suffixes: tuple, what: str) -> None:
    """`key=path` names a file we can write, with a suffix in `suffixes`: checked before any work, not after it."""
    path = Path(path)
    if path.is_dir():
        raise UserError(
            f"{key}={path} is a folder, but {what} is one file; name the file, e.g. "
            f"{key}={path / ('out' + suffixes[0])}"
        )
    if path.suffix.lower() not in suffixes:
        found = f"has the suffix {path.suffix}" if path.suffix else "has no suffix"
        raise UserError(
            f"{key}={path} {found}; {what} is written as {' or '.join(suffixes)}, e.g. "
            f"{key}={path.with_suffix(suffixes[0])}"
        )
    check_writable_folder(key, path.parent)


def check_writable_folder(key: str, folder: Path) -> None:
    """`folder` exists and takes new files, or can be made inside a folder that does."""
    folder = Path(folder)
    existing = nearest_existing(key, folder)
    if not existing.is_dir():
        raise UserError(
            f"{key}: {existing} is a file, not a folder, so nothing can be written under it; pick another path"
        )
    try:
        # An anonymous file (O_TMPFILE on Linux) proves we may write there and leaves nothing behind.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(
            f"{key}: cannot write in {existing} ({error.strerror or error}); pick a folder you can write to"
        ) from None


def nearest_existing(key: str, path: Path) -> Path:
    """`path` or its nearest parent that exists. A link to nothing on the way is refused: making the folder
    would fail on it with "File exists", which names neither the link nor what to do."""
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    if not existing.exists():
        raise UserError(
            f"{key}={path} can't be created: {existing} is a symbolic link to {os.readlink(existing)}, which does "
            f"not exist; make that folder or pick another {key}"
        )
    return existing
