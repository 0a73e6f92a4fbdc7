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
same line). No argument is read here: only what Hydra composed.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, Tuple

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

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


class Failed(BaseException):
    """Carries an error of a check past Hydra, which turns any Exception a callback raises into a warning and
    goes on to write `.hydra/` and the log (an interpolation that does not resolve, a file-system error).
    cli.train_main raises `error` again, and reports it as it reports the same error raised anywhere else."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def refuse_or_continue(check: Callable[[DictConfig], None], hydra_config: DictConfig) -> None:
    global checked
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
    run_dir = Path(os.path.abspath(str(hydra_config.hydra.run.dir)))
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
    sweep_dir = Path(os.path.abspath(str(hydra_config.hydra.sweep.dir)))
    runcard.check_run_dir(str(sweep_dir), "hydra.sweep.dir")
    jobs = grid_jobs(hydra_config)
    for task in [task_config(hydra_config), *(task for _, task in jobs)]:  # Optuna's jobs share the first's keys
        config.check_known_keys(task)  # a misspelt key is the command line's, not one job's: no job would run right
    for task in {OmegaConf.to_yaml(task.dataset) + str(task.conditional): task for _, task in jobs}.values():
        check_data(task)  # each data set the grid trains on, before any job begins
    claimed = [folder_and_config for folder_and_config in jobs if RunFolder(folder_and_config[0]).holds_a_run()]
    refused = []
    for folder, task in claimed:
        if task.trainer.overwrite:  # the job's whole old run moves aside, Hydra's record and log included
            runfolder.claim(folder)
            runfolder.move_aside(RunFolder(folder), keep=())
            runfolder.release_all()
        elif task.trainer.resume != "auto":
            refused.append(folder)
    if refused:
        listed = ", ".join(str(folder) for folder in refused[:5]) + (" ..." if len(refused) > 5 else "")
        raise UserError(
            f"{len(refused)} job folder(s) of this sweep already hold a run ({listed}); nothing was changed. "
            "Continue the sweep with trainer.resume=auto (finished jobs report their stored score), replace "
            f"the jobs' runs with trainer.overwrite=true (they move to each job's replaced/), or pick another "
            f"hydra.sweep.dir than {sweep_dir}"
        )


def grid_jobs(hydra_config: DictConfig) -> List[Tuple[Path, DictConfig]]:
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
        jobs.append((folder, task_config(job_config)))
    return jobs
