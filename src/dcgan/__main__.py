"""The commands' entry points: the console scripts (gan-train, gan-sample, gan-eval, gan-report) and
`python -m dcgan [overrides]`, which is gan-train in the form torchrun takes
(`torchrun --nproc_per_node=N -m dcgan ...`).

Importing torch and the package takes seconds, and nothing is written meanwhile (at a terminal, a note that
erases itself says so): a stop signal then ends the command at once with one line and exit 128 + N, not a
KeyboardInterrupt traceback. From the moment the command runs, cli.py owns the signals.
"""

import os
import signal
from typing import Callable


def _stop_while_starting(program: str) -> None:
    def stop(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        os.write(2, f"{program}: stopped by {name} while starting; nothing was written\n".encode())
        os._exit(128 + signum)  # mid-import: no file is open, so nothing is left half-done

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)


def _note_while_starting(program: str) -> Callable[[], None]:
    """At a terminal, a note while torch imports (seconds of a blank screen otherwise, before even a usage error);
    returns what erases it. Into a pipe or a file nothing is written, so an error stays one line there."""
    if not os.isatty(2):
        return lambda: None
    os.write(2, f"{program}: starting (importing PyTorch)...\r".encode())  # \r: a stop line overwrites it

    def erase() -> None:
        os.write(2, b"\r\x1b[K")  # to the line's start, then clear to its end

    return erase


def _command(program: str, main: str) -> Callable[[], None]:
    """The entry point of `program`: signals owned while importing, then cli's `main`."""

    def run() -> None:
        _stop_while_starting(program)
        erase_note = _note_while_starting(program)
        from dcgan import cli

        erase_note()
        getattr(cli, main)()

    run.__name__ = program.replace("-", "_")
    return run


gan_train = _command("gan-train", "train_main")
gan_sample = _command("gan-sample", "sample_main")
gan_eval = _command("gan-eval", "eval_main")
gan_report = _command("gan-report", "report_main")


if __name__ == "__main__":
    gan_train()
