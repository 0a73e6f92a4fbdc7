"""Sweeps (`gan-train -m ...`): the score each job returns to the sweeper, jobs that fail alone, and a summary.

Under Hydra's multirun, with any sweeper (the basic grid, Optuna) and any launcher (in-process,
joblib, submitit on SLURM), each job trains and then returns `sweep.objective`, which sweepers minimize:

  fid, kid   measured on the job's last checkpoint with gan-eval's protocol (evaluate.py): `eval.n`
             generated images against `eval.reference_n` of the training set (of eval.split when set),
             with eval.inception_weights.
             The stamp is written beside the checkpoint (last.eval.json), as gan-eval writes it.
  loss_g, loss_d   the mean over the last log interval: a quick search without Inception weights.
  none       nothing (a plain grid whose runs are compared later).

The value and its protocol also go into the run's metrics.jsonl (a last row) and run card (`objective`).
A job that fails (a bad value among its overrides, a full disk) or diverges returns +inf, the worst
score there is (hydra-optuna-sweeper ends the whole search on a NaN), and the sweep goes on; a stop by
signal ends the whole sweep. Each job leaves a record in SWEEP_DIR/sweep_jobs/, and when the sweep ends
`SweepSummary` (a Hydra callback, configs/train.yaml) gathers this sweep's records into
SWEEP_DIR/sweep_summary.json and .md.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dcgan import distributed, evaluate, files, metrics, runcard, runfolder, supervise, train
from dcgan.config import validate_train
from dcgan.errors import SAME_SIGNAL_S, STOP_SIGNALS, USAGE_EXIT, Interrupted, UserError, raise_on_stop_signals
from dcgan.layout import RunFolder

log = logging.getLogger(__name__)


FAILED = math.inf  # what a failed or diverged job returns: worse than any score (minimized)
JOBS = "sweep_jobs"  # SWEEP_DIR/sweep_jobs/<job folder>.json: one record per job
SUMMARY = "sweep_summary"  # SWEEP_DIR/sweep_summary.json and .md


def validate_sweep(cfg: DictConfig) -> None:
    """A sweep job's own checks (config.validate_train has checked the name): FID and KID need Inception."""
    if cfg.sweep.objective in metrics.METRICS:
        metrics.validate_metrics("eval.", cfg.eval)
        metrics.require_inception_weights(
            cfg.eval, f"sweep.objective={cfg.sweep.objective}", "sweep.objective=loss_g (or none)"
        )


# ---------------------------------------------------------------- one job


def run_job(cfg: DictConfig, run_dir: Path, job: str, overrides: List[str], keep: List[str]) -> Optional[float]:
    """Check, train and score one job; returns its objective, +inf (the worst) if it failed or diverged, None
    if a signal stopped it (checkpointed) or the sweep was stopping before it began (Optuna marks it failed).

    `keep`: what Hydra wrote into the folder before the job (runfolder.hydra_record). Never exits: a
    failing job must not end the sweep, and a stopped one leaves the stop to SweepSummary (the end of
    the sweep), so a launcher running jobs in other processes (joblib, submitit) waits for every job's
    checkpoint instead of killing it.
    """
    sweep_dir = run_dir.parent
    previous = raise_on_stop_signals()  # outside training a signal raises Interrupted; train() takes it as a stop
    record: Dict[str, Any] = {"job": job, "folder": str(run_dir), "overrides": overrides}
    value: Optional[float] = None
    try:
        if stopped_by(sweep_dir) is None:
            value = train_and_score(cfg, run_dir, job, keep, record)
    except (train.Stopped, Interrupted) as stopped:
        mark_stopped(sweep_dir, stopped.signal)
        how = train.continue_hint(run_dir)  # the sweep's folder: the default one is new on every run
        print(f"gan-train: job {job}: {stopped}; {how}", file=sys.stderr, flush=True)
        record.update(status="interrupted", error=f"{stopped}; {how}")
    finally:
        runfolder.release_all()
        distributed.shutdown()
    if distributed.world().is_main and "status" in record:
        write_record(sweep_dir, record)
    # A launcher's worker process stays deaf to stop signals between jobs: the sweep's process decides.
    in_worker = os.environ.get(SWEEP_PROCESS, str(os.getpid())) != str(os.getpid())
    for signum, handler in previous.items():
        signal.signal(signum, signal.SIG_IGN if in_worker else handler)
    return value


def train_and_score(cfg: DictConfig, run_dir: Path, job: str, keep: List[str], record: Dict[str, Any]) -> float:
    """The job itself; what happened goes into `record`. +inf if it failed or diverged."""
    try:
        distributed.adopt_submitit_tasks()  # a multi-task SLURM job: one DDP process per task
        validate_train(cfg)
        validate_sweep(cfg)
        if distributed.world().enabled:
            distributed.setup(cfg.trainer.device, cfg.trainer.dist_timeout_s)
        runfolder.take(run_dir, cfg, keep)
        earlier = (runcard.read(run_dir) or {}).get("objective") or {}  # a continued job's score, if it has one
        row = supervise.supervise(train.train, cfg, run_dir)
        if not distributed.world().is_main:
            return FAILED  # rank 0 reports the job's score
        value, measured = objective(cfg, run_dir, row, earlier)
        record.update(status="completed", **measured)
        return FAILED if value is None else value
    except UserError as error:
        print(f"gan-train: job {job}: {error}", file=sys.stderr, flush=True)
        record.update(status="failed", error=str(error))
    except supervise.DivergedAndStopped as diverged:
        print(f"gan-train: job {job}: diverged: {diverged}", file=sys.stderr, flush=True)
        record.update(status="diverged", error=str(diverged))
    return FAILED


# ---------------------------------------------------------------- a stop by signal

SWEEP_PROCESS = "DCGAN_SWEEP_PID"  # the sweep's own process, for jobs running in a launcher's workers
STOPPED = "stopped"  # SWEEP_DIR/sweep_jobs/stopped holds the signal that stopped the sweep


def mark_stopped(sweep_dir: Path, signum: int) -> None:
    """Jobs yet to begin see it and don't; the sweep's process exits 128 + signum when the launcher returns."""
    if stopped_by(sweep_dir) is not None:  # the first signal names the stop (a job may see the one passed on)
        return
    try:
        (sweep_dir / JOBS).mkdir(parents=True, exist_ok=True)
        files.atomic_write_text(sweep_dir / JOBS / STOPPED, f"{signum}\n")
    except OSError as error:
        log.warning("could not mark the sweep as stopped in %s: %s", sweep_dir, error)


def stopped_by(sweep_dir: Path) -> Optional[int]:
    try:
        return int((sweep_dir / JOBS / STOPPED).read_text())
    except (OSError, ValueError):
        return None


class SweepStop:
    """The sweep's process, under a launcher whose jobs run in other processes (joblib, submitit_local): a stop
    signal is passed on to those processes as SIGTERM, which every job takes as a stop (it checkpoints) and
    submitit's local controller forwards to its tasks, and the launcher is left to collect the jobs; a second
    signal (after SAME_SIGNAL_S) raises Interrupted at once. Under submitit_local, the terminal's signals are
    ignored here instead (TERMINAL_SIGNALS): the jobs take them."""

    def __init__(self, sweep_dir: Path):
        self.sweep_dir, self.first_s = sweep_dir, None

    def __call__(self, signum: int, frame: Any) -> None:
        global stopping
        now = time.monotonic()
        if self.first_s is not None:
            if now - self.first_s >= SAME_SIGNAL_S:
                raise Interrupted(signum)
            return
        self.first_s, stopping = now, signum
        mark_stopped(self.sweep_dir, signum)
        for child in child_processes(os.getpid()):
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGTERM)


stopping: Optional[int] = None  # the signal that is stopping this process's sweep (a launcher may then fail)
this_sweep: Optional[Path] = None  # the folder of this process's sweep, once it has begun
# What a terminal sends the whole foreground group (Ctrl-C, a closed window). submitit's local controller
# answers SIGINT by killing its tasks a second later, checkpointed or not. Ignored by the sweep's process
# before the launcher starts, they stay ignored in the controller it starts (an ignored signal is inherited),
# while each job takes them itself (run_job installs its own handlers): every job checkpoints, and the sweep
# ends when they have, as under joblib.
TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGHUP)


def stop_signal() -> Optional[int]:
    """The signal that stopped this process's sweep, whether it reached this process or only its jobs."""
    return stopping if stopping is not None else stopped_by(this_sweep) if this_sweep is not None else None


def child_processes(pid: int) -> List[int]:
    """The processes whose parent is `pid` (Linux /proc; none elsewhere)."""
    children = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(entry.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.parent.name))
    return children


def objective(
    cfg: DictConfig, run_dir: Path, row: Dict[str, Any], earlier: Dict[str, Any]
) -> Tuple[Optional[float], Dict[str, Any]]:
    """The job's score by sweep.objective, and what to record of it; also written to metrics and run card.

    A job continued with nothing left to train (trainer.resume=auto over a finished sweep) reports the score
    it had (`earlier`, from its run card) for the same objective at the same step, without measuring again."""
    name, run = cfg.sweep.objective, RunFolder(run_dir)
    if name == "none":
        return None, {"objective": name}
    measured_by = measurement(cfg)
    # A record from before measured_by was kept counts as measured the same way.
    same = earlier.get("objective") == name and earlier.get("measured_by", measured_by) == measured_by
    if same and earlier.get("step") == row["step"] and "value" in earlier:
        log.info("sweep.objective %s = %.6g, as measured before (%s)", name, earlier["value"], earlier["protocol"])
        runcard.update(run_dir, objective=earlier)
        return float(earlier["value"]), earlier
    if name in metrics.METRICS:
        value, protocol = final_score(cfg, run, name)
    else:
        value = float(row[name])
        protocol = f"mean of {name} over the last {cfg.trainer.log_every} steps (step {row['step']})"
    measured = {
        "objective": name,
        "value": value,
        "protocol": protocol,
        "step": row["step"],
        "measured_by": measured_by,
    }
    with open(run.metrics, "a") as file:  # the run's last row: the score at its final step
        file.write(
            json.dumps({"step": row["step"], "epoch": row["epoch"], "sweep_objective": name, name: value}) + "\n"
        )
    runcard.update(run_dir, objective=measured)
    log.info("sweep.objective %s = %.6g (%s)", name, value, protocol)
    return value, measured


def measurement(cfg: DictConfig) -> Dict[str, Any]:
    """What an FID/KID objective depends on (eval.n, the weights, ...): a stored score measured otherwise is
    measured again, or eval.n=10000 on a continued sweep would silently report the eval.n=2000 score. The
    cache's folder changes no score. A loss objective is read from the metrics rows, whatever the settings."""
    if cfg.sweep.objective not in metrics.METRICS:
        return {}
    return {key: value for key, value in OmegaConf.to_container(cfg.eval).items() if key != "cache_dir"}


def final_score(cfg: DictConfig, run: RunFolder, name: str) -> Tuple[float, str]:
    """FID or KID of the last checkpoint, exactly as `gan-eval ckpt=... n=eval.n metrics=[NAME]` measures it."""
    last = run.checkpoints / "last.pt"
    measured = OmegaConf.to_container(cfg.eval)  # a TrainEvalConfig: its fields, not its type
    split = measured.pop("split", None)  # eval.split: gan-eval's dataset.split=SPLIT of the training data set
    reference = {"dataset": {**OmegaConf.to_container(cfg.dataset), "split": split}} if split else {}
    settings = OmegaConf.merge(
        OmegaConf.structured(evaluate.EvalConfig),
        measured,
        {"ckpt": str(last), "metrics": [name], "device": cfg.trainer.device, **reference},
    )
    results, stamp = evaluate.run(settings)
    result = results[0]
    generated, reference = result["generated"], result["reference"]
    protocol = (
        f"gan-eval: {generated['count']} generated ({generated['weights']}, step {generated['step']}) vs "
        f"{reference['count']} reference images; stamp {stamp}"
    )
    return float(result["value"]), protocol


def write_record(sweep_dir: Path, record: Dict[str, Any]) -> None:
    """SWEEP_DIR/sweep_jobs/<job folder>.json; a refusal never replaces the record of a job that ran (it is kept
    beside it as <job folder>.<n>.json), so a sweep run again into its folder loses no score.

    A record that can't be written (a full disk) is one line here; the sweep's process, which may be another
    process (joblib, submitit), finds the job without a record when the sweep ends (unrecorded_jobs) and
    exits 2. The job's own folder still holds its checkpoint and score."""
    folder = sweep_dir / JOBS
    path = folder / f"{Path(record['folder']).name}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if record.get("status") == "failed" and _ran(path):
            path = next(p for n in itertools.count(1) if not (p := path.with_suffix(f".{n}.json")).exists())
        files.atomic_write_text(path, json.dumps({**record, "ended": time.time()}, indent=2) + "\n")
    except OSError as error:
        print(f"gan-train: job {record['job']}: could not write its sweep record {path}: {error}", file=sys.stderr)


def _ran(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("status") in ("completed", "diverged")
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------- before and after the sweep


# The Hydra plugins that a sweep's choices need, by (group, option): the module, and the extra that installs it.
OPTUNA = ("hydra_plugins.hydra_optuna_sweeper", "sweep")
SUBMITIT = ("hydra_plugins.hydra_submitit_launcher", "slurm")
PLUGINS = {
    ("hydra/sweeper", "optuna"): OPTUNA,  # also what configs/hparams_search/ choose
    ("hydra/launcher", "joblib"): ("hydra_plugins.hydra_joblib_launcher", "sweep"),
    **{("hydra/launcher", name): SUBMITIT for name in ("submitit_local", "submitit_slurm", "slurm_gpu", "slurm_ddp")},
}


def missing_plugin(error: Exception) -> Optional[str]:
    """'hydra/launcher=joblib needs the Hydra plugin ...: pip install ...' when Hydra could not find a plugin's
    config because the plugin is not installed; None for any other composition error."""
    import importlib.util

    found = re.search(r"Could not find '([^']+)/([^'/]+)'", str(error))
    module, extra = PLUGINS.get(found.groups(), (None, None)) if found else (None, None)
    if module is None or importlib.util.find_spec(module) is not None:
        return None
    return f"{found[1]}={found[2]} needs the Hydra plugin {module.split('.')[-1]}: pip install 'dcgan[{extra}]'"


def study_seed(base: int, storage: str, study_name: str) -> int:
    """The sampler's seed for an Optuna study continued from `storage`: `base` plus the trials it holds.

    A fixed seed would make a continued study's sampler draw the same first proposals again, repeating
    trials it already ran; counting the stored trials keeps each continuation reproducible and new.
    configs/hparams_search/ set `sampler.seed: ${dcgan.study_seed:0,${hydra.sweeper.storage},NAME}`.
    """
    database = storage.removeprefix("sqlite:///") if storage.startswith("sqlite:///") else None
    if database is not None and not Path(database).is_file():  # a new study; don't make the file here
        return int(base)
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return int(base) + len(optuna.load_study(study_name=study_name, storage=storage).trials)
    except (ImportError, KeyError):  # no plugin (Hydra says which), or no such study yet
        return int(base)


OmegaConf.register_new_resolver("dcgan.study_seed", study_seed, replace=True)


class SweepSummary(Callback):
    """Hydra callback: when a sweep ends, its jobs' records as SWEEP_DIR/sweep_summary.json and .md, sorted by
    objective, failed jobs with their reason; the sweep exits 2 if any job failed on a usage error."""

    def __init__(self) -> None:
        self.started = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        # Before the sweeper starts: Optuna's storage (hparams_search/) lives in the sweep folder.
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / JOBS / STOPPED).unlink(missing_ok=True)  # an earlier, stopped sweep: this one goes on
        os.environ[SWEEP_PROCESS] = str(os.getpid())
        global this_sweep
        this_sweep = sweep_dir
        launcher = str(config.hydra.launcher.get("_target_", ""))
        if not launcher.endswith("BasicLauncher"):
            for signum in STOP_SIGNALS:
                signal.signal(signum, SweepStop(sweep_dir))
        if launcher.endswith("LocalLauncher"):  # submitit_local: see SweepStop
            for signum in TERMINAL_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        records = read_records(sweep_dir)
        if records:
            write_summary(sweep_dir, records)  # every job ever recorded in this folder, best first
            this_sweep = [r for r in records if r.get("ended", 0) >= self.started]
            print(summary_line(this_sweep, sweep_dir), file=sys.stderr, flush=True)
        signum = stopped_by(sweep_dir)
        if signum is not None:  # every job that had begun is checkpointed; the rest did not begin
            raise Interrupted(signum)
        unrecorded = unrecorded_jobs(sweep_dir, records, self.started)
        if unrecorded:
            print(
                f"gan-train: error: {len(unrecorded)} job(s) of this sweep left no record in {sweep_dir / JOBS} "
                f"({', '.join(unrecorded)}): free space there, then run the sweep again with trainer.resume=auto",
                file=sys.stderr,
                flush=True,
            )
        if unrecorded or any(r.get("status") == "failed" and r.get("ended", 0) >= self.started for r in records):
            raise SystemExit(USAGE_EXIT)


def unrecorded_jobs(sweep_dir: Path, records: List[Dict[str, Any]], started: float) -> List[str]:
    """The folders of this sweep's jobs (Hydra wrote their .hydra/ since `started`) that have no record since."""
    recorded = {Path(r.get("folder", "")).resolve() for r in records if r.get("ended", 0) >= started}
    missing = []
    for hydra_record in sorted(sweep_dir.glob("**/.hydra/config.yaml")):
        folder = hydra_record.parent.parent
        with contextlib.suppress(OSError):
            if hydra_record.stat().st_mtime >= started and folder.resolve() not in recorded:
                missing.append(str(folder.relative_to(sweep_dir)))
    return missing


def read_records(sweep_dir: Path) -> List[Dict[str, Any]]:
    """Every job record in the folder: this sweep's, and those of earlier sweeps run into it."""
    records = []
    for path in sorted((sweep_dir / JOBS).glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return records


def write_summary(sweep_dir: Path, records: List[Dict[str, Any]]) -> None:
    def order(record: Dict[str, Any]) -> Tuple[int, float]:
        value = record.get("value")
        return (0, value) if isinstance(value, (int, float)) and math.isfinite(value) else (1, 0.0)

    records = sorted(records, key=order)
    lines = [
        f"# Sweep summary: {sweep_dir}",
        "",
        "| job | status | objective | value | overrides | reason |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        value = r.get("value")
        shown = f"{value:.6g}" if isinstance(value, (int, float)) else "-"
        reason = (r.get("error") or "").replace("|", "\\|")
        overrides = " ".join(r.get("overrides", [])).replace("|", "\\|")
        lines.append(f"| {r['job']} | {r['status']} | {r.get('objective', '-')} | {shown} | {overrides} | {reason} |")
    files.atomic_write_text(sweep_dir / f"{SUMMARY}.json", json.dumps(records, indent=2) + "\n")
    files.atomic_write_text(sweep_dir / f"{SUMMARY}.md", "\n".join(lines) + "\n")


def summary_line(records: List[Dict[str, Any]], sweep_dir: Path) -> str:
    statuses = ("completed", "diverged", "failed", "interrupted")
    counts = {status: sum(r.get("status") == status for r in records) for status in statuses}
    failed = "; ".join(f"job {r['job']}: {r.get('error')}" for r in records if r.get("status") == "failed")
    said = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    return f"gan-train: sweep of {len(records)} jobs: {said}{' (' + failed + ')' if failed else ''}; " + (
        f"summary in {sweep_dir / SUMMARY}.md"
    )
