"""What gan-train checks before anything is written: the config Hydra composed and the folder it will use.

Hydra reads the whole command line itself (overrides in any spelling: quoted, interpolated, `+`, `++`,
`~`; `-cn`, `-cp`, `--config-dir`; `-m`), composes the config, and then calls its callbacks'
`on_run_start` / `on_multirun_start` before it makes the run folder and writes `.hydra/` and the log
there. `PreCheck` (the first callback in configs/train.yaml) checks at that moment, on that very config:

  a run      config.validate_train (every key is one the schema knows: `+trainer.max_step=3` is
             refused, naming max_steps; then each module's checks); the data is there
             (data.check_available), and its classes with conditional=true; the run folder Hydra will
             use (rank 0's under torchrun), its one owner and its one run (runfolder.take: the lock,
             resume or overwrite).
  a sweep    the sweep folder can be made; a grid's jobs each compose, with no key the schema lacks
             (a misspelt key is the command line's: every job would be wrong), their data is there, and the
             folders they will use either hold nothing, or are continued (`trainer.resume=auto`), or
             are moved aside whole, Hydra's record and log included (`trainer.overwrite=true`);
             otherwise nothing is touched.

A refusal is one line on stderr and exit code 2 (cli.py turns Hydra's own composition errors into the
same line). No override is read here: only what Hydra composed. gan-train puts PreCheck among Hydra's callbacks on
the command line itself (with_precheck), so a primary config of the user's own (`-cp`/`-cn`) is checked too.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Set

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

from dcgan import config, data, distributed, runcard, runfolder
from dcgan.errors import UserError, exit_with
from dcgan.layout import RunFolder


class PreCheck(Callback):
    """Hydra callback: refuse a run or a sweep before Hydra writes anything (module docstring)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        refuse_or_continue(check_run, config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        refuse_or_continue(check_sweep, config)


checked = False  # set once PreCheck ran in this process: later errors are the run's, not the command line's
folder: Optional[Path] = None  # the run or sweep folder checked: where Hydra writes its record next


class Failed(BaseException):
    """Carries an error of a check past Hydra, which turns any Exception a callback raises into a warning and
    goes on to write `.hydra/` and the log (an interpolation that does not resolve, a file-system error).
    cli.train_main raises `error` again, and reports it as it reports the same error raised anywhere else."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


# PreCheck among Hydra's callbacks whatever the primary config: a config of the user's own (-cp/-cn) may lack it.
ALWAYS = "++hydra.callbacks.precheck._target_=dcgan.precheck.PreCheck"
# Hydra's flags that take the next word as their value; `--info` and `-sc` (no run) are left as they are.
VALUED_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "-c", "--cfg", "-p", "--package")
NO_RUN = ("-sc", "--shell-completion", "--info", "-h", "--help", "--hydra-help")


def with_precheck(args: List[str]) -> List[str]:
    """gan-train's words for Hydra's parser, with ALWAYS last among the overrides (after a user's own
    `~hydra.callbacks.precheck`). Hydra's parser takes the overrides as one run of words between its flags,
    so ALWAYS goes at the end of that run. refuse_or_continue takes it out of sys.argv again (the run card
    and the data's messages quote the user's command)."""
    if any(arg.split("=")[0] in NO_RUN for arg in args):
        return args
    start = 0
    while start < len(args) and args[start].startswith("-"):
        start += 2 if args[start] in VALUED_FLAGS else 1
    end = next((i for i in range(start, len(args)) if args[i].startswith("-")), len(args))
    return [*args[:end], ALWAYS, *args[end:]]


def refuse_or_continue(check: Callable[[DictConfig], None], hydra_config: DictConfig) -> None:
    global checked
    sys.argv = [arg for arg in sys.argv if arg != ALWAYS]
    try:
        check(hydra_config)
    except UserError as error:
        runfolder.release_all()
        distributed.shutdown()
        exit_with(error, "gan-train")
    except Exception as error:
        runfolder.release_all()
        distributed.shutdown()
        raise Failed(error) from None
    checked = True


def task_config(hydra_config: DictConfig) -> DictConfig:
    """The training config Hydra will hand the task function: the composed config without its `hydra` node."""
    task = copy.deepcopy(hydra_config)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


# ---------------------------------------------------------------- a run


def check_run(hydra_config: DictConfig) -> None:
    HydraConfig.instance().set_config(hydra_config)  # so ${hydra:...} in a user's config resolves, as in the run
    task = task_config(hydra_config)
    config.validate_train(task)
    check_data(task)  # missing data (or labels) is refused, or downloaded, before any run folder exists
    if distributed.world().enabled:  # under torchrun: join the job, and write into rank 0's run folder
        distributed.setup(task.trainer.device, task.trainer.dist_timeout_s)
        share_run_dir(hydra_config)
    global folder
    run_dir = folder = Path(os.path.abspath(str(hydra_config.hydra.run.dir)))
    runcard.check_run_dir(str(run_dir))  # Hydra would fail on it with a traceback
    runfolder.take(run_dir, task)  # one owner, one run: decided before Hydra writes there


def share_run_dir(hydra_config: DictConfig) -> None:
    """Every rank of a torchrun job uses rank 0's run folder; only rank 0 writes Hydra's record and log."""
    chosen = distributed.object_from_main(os.path.abspath(str(hydra_config.hydra.run.dir)))
    with read_write(hydra_config.hydra):
        hydra_config.hydra.run.dir = chosen
        if not distributed.world().is_main:
            hydra_config.hydra.output_subdir = None
            hydra_config.hydra.job_logging = OmegaConf.load(Path(HYDRA_CONF) / "hydra/job_logging/stdout.yaml")


HYDRA_CONF = Path(sys.modules["hydra"].__file__).parent / "conf"


def check_data(task: DictConfig) -> None:
    """The images are there (data.check_available), and their classes too when the run is conditional."""
    data.check_available(task.dataset)
    if task.conditional:
        data.check_labels_available(task.dataset)


# ---------------------------------------------------------------- a sweep


def check_sweep(hydra_config: DictConfig) -> None:
    global folder
    sweep_dir = folder = Path(os.path.abspath(str(hydra_config.hydra.sweep.dir)))
    runcard.check_run_dir(str(sweep_dir), "hydra.sweep.dir")
    trials = hydra_config.hydra.sweeper.get("n_trials")  # Optuna's; with none to run it ends in a traceback
    if trials is not None and trials < 1:
        raise UserError(
            f"hydra.sweeper.n_trials={trials} runs no trial; give 1 or more (the same command again continues "
            "the study with that many more)"
        )
    jobs = grid_jobs(hydra_config)
    for task in [task_config(hydra_config), *(job.task for job in jobs)]:  # Optuna's jobs share the first's keys
        config.check_known_keys(task)  # a misspelt key is the command line's, not one job's: no job would run right
    for task in {OmegaConf.to_yaml(job.task.dataset) + str(job.task.conditional): job.task for job in jobs}.values():
        check_data(task)  # each data set the grid trains on, before any job begins
    claimed = [job for job in jobs if RunFolder(job.folder).holds_a_run()]
    refused = [job.folder for job in claimed if not job.task.trainer.overwrite and job.task.trainer.resume != "auto"]
    if refused:
        listed = ", ".join(str(folder) for folder in refused[:5]) + (" ..." if len(refused) > 5 else "")
        raise UserError(
            f"{len(refused)} job folder(s) of this sweep already hold a run ({listed}); nothing was changed. "
            "Continue the sweep with trainer.resume=auto (finished jobs report their stored score), replace "
            f"the jobs' runs with trainer.overwrite=true (they move to each job's replaced/), or pick another "
            f"hydra.sweep.dir than {sweep_dir}"
        )
    check_same_jobs(claimed, jobs)
    for job in claimed:
        if job.task.trainer.overwrite:  # the job's whole old run moves aside, Hydra's record and log included
            runfolder.claim(job.folder)
            runfolder.move_aside(RunFolder(job.folder), keep=())
            runfolder.release_all()


class Job(NamedTuple):
    folder: Path
    task: DictConfig  # the training config the job will run
    overrides: List[str]  # the job's overrides, as Hydra records them in FOLDER/.hydra/overrides.yaml


# How a job is continued, not which job it is.
NOT_WHICH_JOB = ("trainer.resume", "trainer.overwrite")


def check_same_jobs(claimed: List[Job], jobs: List[Job]) -> None:
    """A continued job folder must hold a run of the same job: the same values of the keys the sweep varies
    (now or when the folder's run was made). A grid listed in another order (loss=hinge,ns after loss=ns,hinge)
    would continue each folder's run with the other job's settings and put its score under them. Settings
    given to every job alike (a longer trainer.max_steps) may change, as in any resume."""
    before = {job.folder: recorded_settings(job.folder) for job in claimed}
    before = {folder: given for folder, given in before.items() if given is not None}
    now = {job.folder: settings(job.overrides) for job in jobs}
    varied = varying(list(before.values())) | varying(list(now.values()))
    for job in claimed:
        if job.task.trainer.overwrite or job.folder not in before:
            continue
        changed = sorted(key for key in varied if before[job.folder].get(key) != now[job.folder].get(key))
        if changed:
            was, asked = (
                [f"{key}={given.get(key, '(default)')}" for key in changed]
                for given in (before[job.folder], now[job.folder])
            )
            raise UserError(
                f"{job.folder} holds the run of another job ({' '.join(was)}) than this sweep's job there "
                f"({' '.join(asked)}); nothing was changed. To continue a sweep, list its values in the order first "
                "given (new ones at the end); or pick another hydra.sweep.dir"
            )


def recorded_settings(folder: Path) -> Optional[Dict[str, str]]:
    """The settings a job folder's run was made with, from Hydra's record of its overrides."""
    try:
        recorded = OmegaConf.load(folder / ".hydra" / "overrides.yaml")
        return settings([str(override) for override in recorded]) if isinstance(recorded, ListConfig) else None
    except Exception:  # no record (a job killed before Hydra wrote it), or a damaged one: nothing to compare
        return None


def settings(overrides: List[str]) -> Dict[str, str]:
    """{key: value} of a job's overrides, read by Hydra's own parser (`+key=v`, `++key=v` and `key=v` alike,
    quoting as Hydra reads it; `~key` as deleted)."""
    given = {
        o.key_or_group: "(deleted)" if o.is_delete() else o.get_value_element_as_str()
        for o in OverridesParser.create().parse_overrides(overrides)
    }
    return {key: value for key, value in given.items() if key not in NOT_WHICH_JOB}


def varying(jobs: List[Dict[str, str]]) -> Set[str]:
    """The keys whose value is not the same in every job."""
    keys = {key for job in jobs for key in job}
    return {key for key in keys if len({job.get(key) for job in jobs}) > 1}


def grid_jobs(hydra_config: DictConfig) -> List[Job]:
    """The basic sweeper's jobs, each composed by Hydra as its launcher will compose it, with its folder.

    A value of the wrong type would otherwise end the sweep halfway, when Hydra composes that job. Values of
    the right type that a check refuses (a batch size of -1) fail their own job only, when it runs. Other
    sweepers (Optuna) draw their jobs as they go, each into a folder of its own.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not str(hydra_config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return []
    overrides = OmegaConf.to_container(hydra_config.hydra.overrides.task)
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
    loader = GlobalHydra.instance().config_loader()
    jobs = []
    for number, job in enumerate(job for batch in batches for job in batch):
        try:
            job_config = loader.load_sweep_config(hydra_config, list(job))
        except Exception as error:  # Hydra's and OmegaConf's own composition errors
            raise UserError(
                f"sweep job {' '.join(job)} can't be composed: {config.describe_config_error(error)}; no job was run"
            ) from None
        with read_write(job_config.hydra), open_dict(job_config.hydra):
            job_config.hydra.job.num = number
            job_config.hydra.job.id = number
        folder = Path(os.path.abspath(os.path.join(job_config.hydra.sweep.dir, str(job_config.hydra.sweep.subdir))))
        jobs.append(Job(folder, task_config(job_config), list(job)))
    return jobs
