"""The command line: `gan-train`, `gan-sample`, `gan-eval` and `gan-report`.

Each command composes its config (config.py) from the command line, checks it, runs, and turns a
UserError into one line on stderr and exit code 2 (errors.py lists the exit codes). gan-train lets
Hydra compose from the whole command line; precheck.py checks that config and takes the run folder
(runfolder.py: one owner, one run) before Hydra writes into it, then Hydra calls the training loop
(train.py) under the divergence supervisor (supervise.py).
How a run ends (finished, stopped by a signal, diverged) becomes its exit code here and only here.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dcgan import distributed, evaluate, precheck, report, runfolder, sample, supervise, sweep, train
from dcgan.config import compose, config_dir, describe_config_error, validate_train
from dcgan.errors import (
    DIVERGED_EXIT,
    USAGE_EXIT,
    Interrupted,
    UserError,
    exit_with,
    interrupted_exit,
    raise_on_stop_signals,
    restore_signals,
    signal_exit,
)


def exit_with_help(usage: str, about: str, config_name: str, args: List[str]) -> None:
    """On --help or -h: how to call the command, what it does, and every setting with its default; exit 0."""
    if not any(arg in ("--help", "-h") for arg in args):
        return
    try:
        print(f"usage: {usage.strip().replace('`', '').rstrip('.')}\n\n{about.strip()}\n")
        print("Settings, given as KEY=VALUE (defaults shown; each is explained in the module that owns them):\n")
        print(OmegaConf.to_yaml(compose(config_name, [])), flush=True)
    except BrokenPipeError:
        reader_has_enough()
    sys.exit(0)


def reader_has_enough() -> None:
    """`gan-sample --help | head`: the reader closed the pipe with all it wanted; end quietly, not with a
    second BrokenPipeError when Python flushes stdout at exit."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# ---------------------------------------------------------------- gan-train


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> Optional[float]:
    """The task function: one run, or one job of a sweep, which returns its objective to the sweeper."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:  # a job that fails returns +inf and the sweep goes on (sweep.py)
        keep = runfolder.hydra_record(hydra_cfg.job.name)
        return sweep.run_job(cfg, run_dir, str(hydra_cfg.job.num), list(hydra_cfg.overrides.task), keep)
    try:
        if not precheck.checked:  # a primary config of the user's own (-cp) without our callbacks: check now
            validate_train(cfg)
        # PreCheck took the folder already (then this does nothing), except under a config without it.
        runfolder.take(run_dir, cfg, keep=runfolder.hydra_record(hydra_cfg.job.name))
        train_in_run_dir(cfg, run_dir)
    except UserError as error:
        exit_with(error, "gan-train")
    return None


def train_in_run_dir(cfg: DictConfig, run_dir: Path) -> Dict[str, Any]:
    """What gan-train runs once its run folder is taken: train() under the divergence supervisor.

    Returns the last metrics row. A stop by signal N exits 128 + N, a divergence that was not rolled
    back exits DIVERGED_EXIT with the report as one line on stderr; a UserError is left to the caller.
    """
    try:
        return supervise.supervise(train.train, cfg, run_dir)  # stop or roll back on divergence
    except train.Stopped as stopped:
        raise SystemExit(signal_exit(stopped.signal)) from None
    except supervise.DivergedAndStopped as diverged:
        if distributed.world().is_main:
            print(f"gan-train: diverged: {diverged}", file=sys.stderr)
        raise SystemExit(DIVERGED_EXIT) from None


# Printed before Hydra's own --hydra-help, which names bash and fish but not zsh, nor our sweeps.
HYDRA_HELP = """gan-train: Hydra's options. The training settings: gan-train --help.

== Tab completion ==
Completes config groups, their options and keys (gan-train dataset=<TAB>):
  bash:  eval "$(gan-train -sc install=bash)"        (add the line to ~/.bashrc to keep it)
  zsh:   autoload -Uz bashcompinit && bashcompinit && eval "$(gan-train -sc install=bash)"    (in ~/.zshrc)
  fish:  gan-train -sc install=fish | source        (in ~/.config/fish/config.fish)

== Sweeps, studies and clusters (docs/sweeps.md) ==
  gan-train -m loss=ns,hinge                    a grid, one job after another; each returns sweep.objective
  gan-train -m +study=gpu_recipes               a study: a sweep kept as a config (configs/study/)
  gan-report sweep=DIR                          one page comparing a sweep's jobs, best first
  gan-train -m hparams_search=fashion_optuna    an Optuna search (pip install ".[sweep]")
  gan-train -m hydra/launcher=slurm_gpu ...     each job a SLURM job; slurm_ddp: one DDP process per task
  gan-train -m hydra/launcher=joblib ...        several small jobs at once on one machine
"""


def train_main(argv: Optional[List[str]] = None) -> None:
    """`gan-train [overrides]`: Hydra composes the config from the command line; PreCheck (precheck.py) checks it
    and takes the run folder before Hydra writes anything; then Hydra calls train()."""
    args = sys.argv[1:] if argv is None else argv
    precheck.checked, precheck.folder = False, None  # this invocation's checks are still to come
    if any(arg.split("=")[0] == "--experimental-rerun" for arg in args):
        # Hydra calls the task with a pickled config, skipping every check, the lock and Hydra's own run setup.
        exit_with(UserError(RERUN_REFUSED), "gan-train")
    if "--hydra-help" in args:
        try:
            print(HYDRA_HELP, flush=True)
        except BrokenPipeError:
            reader_has_enough()
            return
    # Hydra prints its own composition errors over several lines and exits 1; asked to raise them instead,
    # it hands them to us, and they become one line and exit 2 like ours. A user's HYDRA_FULL_ERROR wins.
    earlier = os.environ.get("HYDRA_FULL_ERROR")
    wants_traceback, os.environ["HYDRA_FULL_ERROR"] = earlier == "1", "1"
    sys.argv = [sys.argv[0], *precheck.with_precheck(args)]
    handlers = raise_on_stop_signals()  # start-up, scoring, a 2nd Ctrl-C: one line (train() checkpoints on the 1st)
    try:
        try:
            _hydra_main()
        except precheck.Failed as failed:  # raised past Hydra's callback runner: handled below like any other
            raise failed.error from None
    except Interrupted as interrupted:
        interrupted_exit(interrupted, "gan-train", STOPPED_HOW)
    except BrokenPipeError:  # gan-train --help | head (Hydra prints the help)
        reader_has_enough()
    except SystemExit as exit:
        # Hydra reports some usage errors itself with exit code 1; they are usage errors like ours.
        raise SystemExit(USAGE_EXIT if exit.code == 1 else exit.code) from None
    except (HydraException, OmegaConfBaseException) as error:
        if precheck.checked or wants_traceback:  # raised by the run, not by the command line: a bug
            raise
        exit_with(UserError(sweep.missing_plugin(error) or describe_config_error(error)), "gan-train")
    except OSError as error:  # e.g. Hydra's own record (.hydra/, the log) on a full or read-only disk
        if error.errno not in USER_FILE_ERRORS:
            raise
        # A write that fails at flush or close names no file: the folder Hydra was writing in does.
        where = error.filename or (f"a file in {precheck.folder}" if precheck.folder else "a file")
        full = error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        advice = "free some disk space or" if full else "check its permissions, or"
        exit_with(UserError(f"could not write {where}: {error.strerror}; {advice} pick another folder"), "gan-train")
    except Exception:
        if sweep.stop_signal() is None:
            raise
        # A launcher whose jobs a signal ended (submitit) reports them as failed: the stop is the news.
        interrupted_exit(Interrupted(sweep.stop_signal()), "gan-train", STOPPED_HOW)
    finally:
        runfolder.release_all()
        distributed.shutdown()
        restore_signals(handlers)
        if earlier is None:
            del os.environ["HYDRA_FULL_ERROR"]
        else:
            os.environ["HYDRA_FULL_ERROR"] = earlier


RERUN_REFUSED = (
    "--experimental-rerun would run without gan-train's checks or its run-folder lock, and gan-train writes no "
    "config.pickle for it: run the same command again (its overrides are in RUN_DIR/.hydra/overrides.yaml), "
    "or continue the run with trainer.resume=auto"
)

# What a file system can do to any write: full, over quota, too large, read-only, not ours.
USER_FILE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)

STOPPED_HOW = (
    "; every file written is whole, and a run that had begun training is checkpointed: continue it (or the "
    "sweep) with trainer.resume=auto"
)


# ---------------------------------------------------------------- gan-sample, gan-eval, gan-report


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is when it writes (the terminal, or a caller's capture)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def log_to_stderr(program: str) -> None:
    """The command's progress lines, `program: message`, on stderr (one handler, however often it is called)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(handler)
    handler = _Stderr()
    handler.setFormatter(logging.Formatter(f"{program}: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def stops_cleanly(program: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A command that a stop signal ends with one line and exit 128 + N (its files are written whole)."""

    def wrap(main: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(main)
        def run(argv: Optional[List[str]] = None) -> None:
            handlers = raise_on_stop_signals()
            try:
                main(argv)
            except Interrupted as interrupted:
                interrupted_exit(interrupted, program, "; every file written is whole")
            finally:
                restore_signals(handlers)

        return run

    return wrap


@stops_cleanly("gan-sample")
def sample_main(argv: List[str] | None = None) -> None:
    """`gan-sample ckpt=PATH [mode=grid|seeds|interpolate|neighbors|export|classes] [n=64] [seeds=0-63]
    [truncation=0.7] [class=NAME|INDEX] [out=...]`."""
    args = sys.argv[1:] if argv is None else argv
    # Hydra reads a,b as a sweep; for seeds it can only mean a list, so quote it on the user's behalf.
    args = [f"seeds='{a[6:]}'" if a.startswith("seeds=") and "," in a and a[6:7] not in "'\"[" else a for a in args]
    exit_with_help(sample_main.__doc__, sample.__doc__, "sample", args)
    try:
        cfg = compose("sample", args)
        written = sample.run(sample.request(cfg))
    except UserError as error:
        exit_with(error, "gan-sample")
    for path in written[:3]:
        print(f"wrote {path}")
    if len(written) > 3:
        print(f"... and {len(written) - 3} more in {written[0].parent}")


@stops_cleanly("gan-eval")
def eval_main(argv: Optional[List[str]] = None) -> None:
    """`gan-eval ckpt=PATH [dataset=NAME] [n=10000] [metrics=[fid,kid]] [inception_weights=PATH]`,
    or `gan-eval input1=FOLDER input2=FOLDER`, or `gan-eval fp16_copy=OUT.pth inception_weights=PATH`."""
    log_to_stderr("gan-eval")
    args = sys.argv[1:] if argv is None else argv
    exit_with_help(eval_main.__doc__, evaluate.__doc__, "eval", args)
    try:
        if any(a.startswith("dataset.") for a in args) and not any(a.startswith("dataset=") for a in args):
            raise UserError(
                "dataset.KEY=... changes a data set you name: add dataset=NAME (e.g. "
                "dataset=fashion_mnist); "
                "without one, the checkpoint's own training set is used as it was trained"
            )
        cfg = compose("eval", args)
        if cfg.fp16_copy:  # staging the weights, not an evaluation
            print(evaluate.write_fp16_copy(cfg))
            return
        results, out = evaluate.run(cfg)
    except UserError as error:
        exit_with(error, "gan-eval")
    print(evaluate.format_table(results))
    print(f"wrote {out}")


@stops_cleanly("gan-report")
def report_main(argv: Optional[List[str]] = None) -> None:
    """`gan-report run=DIR [fps=4] [max_frames=100]`, or `gan-report sweep=DIR [out=PAGE.md] [title=...]`."""
    args = sys.argv[1:] if argv is None else argv
    exit_with_help(report_main.__doc__, report.__doc__, "report", args)
    log_to_stderr("gan-report")
    try:
        written = report.run(OmegaConf.to_object(compose("report", args)))
    except UserError as error:
        exit_with(error, "gan-report")
    for path in written:
        print(f"wrote {path}")
