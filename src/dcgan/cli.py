"""The command line: `gan-train`, `gan-sample`, `gan-eval` and `gan-report`.

Each command composes its config (config.py) from the command line, checks it, runs, and turns a
UserError into one line on stderr and exit code 2 (errors.py lists the exit codes). gan-train checks
its overrides and takes the run folder (runfolder.py: one owner, one run) before Hydra writes into it,
then Hydra calls the training loop (train.py) under the divergence supervisor (supervise.py).
How a run ends (finished, stopped by a signal, diverged) becomes its exit code here and only here.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dcgan import distributed, evaluate, report, runcard, runfolder, sample, supervise, sweep, train
from dcgan.config import compose, config_dir, validate_train, with_config_dir
from dcgan.errors import DIVERGED_EXIT, USAGE_EXIT, UserError, exit_with, signal_exit


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
    if hydra_cfg.mode == RunMode.MULTIRUN:
        try:  # a job that fails returns +inf, the worst score, and the sweep goes on (sweep.py)
            keep = runfolder.hydra_record(hydra_cfg.job.name)
            return sweep.run_job(cfg, run_dir, str(hydra_cfg.job.num), list(hydra_cfg.overrides.task), keep)
        except train.Stopped as stopped:  # but a signal stops the sweep
            raise SystemExit(signal_exit(stopped.signal)) from None
    try:
        # main() took the folder already, except for a multirun's jobs, whose folders Hydra names.
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

== Sweeps and clusters (docs/sweeps.md) ==
  gan-train -m loss=ns,hinge                    a grid, one job after another; each returns sweep.objective
  gan-train -m hparams_search=fashion_optuna    an Optuna search (pip install ".[sweep]")
  gan-train -m hydra/launcher=slurm_gpu ...     each job a SLURM job; slurm_ddp: one DDP process per task
  gan-train -m hydra/launcher=joblib ...        several small jobs at once on one machine
"""


def train_main(argv: Optional[List[str]] = None) -> None:
    """`gan-train [overrides]`: check the config, then let Hydra make the run folder and call train()."""
    args = sys.argv[1:] if argv is None else argv
    try:  # --config-dir as the search path it adds, so the checks below compose what Hydra will
        overrides = with_config_dir(args)
    except UserError as error:
        exit_with(error, "gan-train")
    if "--hydra-help" in args:
        try:
            print(HYDRA_HELP, flush=True)
        except BrokenPipeError:
            reader_has_enough()
            return
    # Flags (--help, --cfg job, --multirun) are Hydra's business; plain overrides are checked here first.
    if any(arg in ("-m", "--multirun") for arg in overrides):
        try:  # each job is checked when it runs; what would end the sweep halfway is checked now
            sweep.check_sweep(overrides)
        except UserError as error:
            exit_with(error, "gan-train")
    elif not any(arg.startswith("-") for arg in overrides):
        try:
            cfg = compose("train", overrides)
            validate_train(cfg)
            runcard.check_run_dir(run_dir_from(args))  # Hydra would fail on it with a traceback
            if distributed.world().enabled:  # under torchrun: join the job, use rank 0's run folder
                distributed.setup(cfg.trainer.device, cfg.trainer.dist_timeout_s)
                args = distributed.shared_run_dir(args, run_dir_from(args))
            # One owner per run folder, and no second run mixed into it: decided before Hydra writes there.
            runfolder.take(Path(run_dir_from(args)), cfg)
        except UserError as error:
            runfolder.release_all()
            distributed.shutdown()
            exit_with(error, "gan-train")
    sys.argv = [sys.argv[0], *args]
    try:
        _hydra_main()
    except BrokenPipeError:  # gan-train --help | head (Hydra prints the help)
        reader_has_enough()
    except SystemExit as exit:
        # Hydra reports its own config errors with exit code 1; they are usage errors like ours.
        raise SystemExit(USAGE_EXIT if exit.code == 1 else exit.code) from None
    finally:
        runfolder.release_all()
        distributed.shutdown()


def run_dir_from(args: List[str]) -> str:
    """The run folder Hydra would pick for these args: hydra.run.dir=..., or train.yaml's dated default."""
    for arg in args:
        if arg.startswith("hydra.run.dir="):
            return arg.split("=", 1)[1]
    run = OmegaConf.load(config_dir() / "train.yaml").hydra.run
    template = OmegaConf.to_container(run)["dir"]  # unresolved: ${now:...}
    now = datetime.datetime.now()
    return re.sub(r"\$\{now:([^}]*)\}", lambda match: now.strftime(match.group(1)), template)


# ---------------------------------------------------------------- gan-sample, gan-eval, gan-report


def sample_main(argv: List[str] | None = None) -> None:
    """`gan-sample ckpt=PATH [mode=grid|seeds|interpolate|neighbors|export] [n=64] [seeds=0-63] [truncation=0.7]
    [out=...]`."""
    args = sys.argv[1:] if argv is None else argv
    # Hydra reads a,b as a sweep; for seeds it can only mean a list, so quote it on the user's behalf.
    args = [f"seeds='{a[6:]}'" if a.startswith("seeds=") and "," in a and a[6:7] not in "'\"[" else a for a in args]
    exit_with_help(sample_main.__doc__, sample.__doc__, "sample", args)
    try:
        cfg = compose("sample", args)
        written = sample.run(OmegaConf.to_object(cfg))
    except UserError as error:
        exit_with(error, "gan-sample")
    for path in written[:3]:
        print(f"wrote {path}")
    if len(written) > 3:
        print(f"... and {len(written) - 3} more in {written[0].parent}")


def eval_main(argv: Optional[List[str]] = None) -> None:
    """`gan-eval ckpt=PATH [dataset=NAME] [n=10000] [metrics=[fid,kid]] [inception_weights=PATH]`,
    or `gan-eval input1=FOLDER input2=FOLDER`."""
    logging.basicConfig(level=logging.INFO, format="gan-eval: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    exit_with_help(eval_main.__doc__, evaluate.__doc__, "eval", args)
    try:
        if any(a.startswith("dataset.") for a in args) and not any(a.startswith("dataset=") for a in args):
            raise UserError(
                "dataset.KEY=... changes a data set you name: add dataset=NAME (e.g. "
                "dataset=fashion_mnist); "
                "without one, the checkpoint's own training set is used as it was trained"
            )
        results, out = evaluate.run(compose("eval", args))
    except UserError as error:
        exit_with(error, "gan-eval")
    print(evaluate.format_table(results))
    print(f"wrote {out}")


def report_main(argv: Optional[List[str]] = None) -> None:
    """`gan-report run=DIR [fps=4] [max_frames=100]`."""
    args = sys.argv[1:] if argv is None else argv
    exit_with_help(report_main.__doc__, report.__doc__, "report", args)
    logging.basicConfig(level=logging.INFO, format="gan-report: %(message)s")
    try:
        written = report.run(OmegaConf.to_object(compose("report", args)))
    except UserError as error:
        exit_with(error, "gan-report")
    for path in written:
        print(f"wrote {path}")
