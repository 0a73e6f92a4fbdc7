"""The commands' entry points: the console scripts (gan-train, gan-sample, gan-eval, gan-report) and
`python -m dcgan [overrides]`, which is gan-train in the form torchrun takes
(`torchrun --nproc_per_node=N -m dcgan ...`).

Importing torch and the package takes seconds, and nothing is written meanwhile: a stop signal then ends
the command at once with one line and exit 128 + N, not a KeyboardInterrupt traceback. From the moment
the command runs, cli.py owns the signals.
"""

import os
import signal


def _stop_while_starting(program: str) -> None:
    def stop(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        os.write(2, f"{program}: stopped by {name} while starting; nothing was written\n".encode())
        os._exit(128 + signum)  # mid-import: no file is open, so nothing is left half-done

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)


def gan_train() -> None:
    _stop_while_starting("gan-train")
    from dcgan.cli import train_main

    train_main()


def gan_sample() -> None:
    _stop_while_starting("gan-sample")
    from dcgan.cli import sample_main

    sample_main()


def gan_eval() -> None:
    _stop_while_starting("gan-eval")
    from dcgan.cli import eval_main

    eval_main()


def gan_report() -> None:
    _stop_while_starting("gan-report")
    from dcgan.cli import report_main

    report_main()


if __name__ == "__main__":
    gan_train()
