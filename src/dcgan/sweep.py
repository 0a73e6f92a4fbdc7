"""Sweeps (`gan-train -m ...`): the score each job returns to the sweeper, jobs that fail alone, and a summary.

Under Hydra's multirun, with any sweeper (the basic grid, Optuna) and any launcher (in-process,
joblib, submitit on SLURM), each job trains and then returns `sweep.objective`, which sweepers minimize:

  fid, kid   measured on the job's last checkpoint with gan-eval's protocol (evaluate.py): `eval.n`
             generated images against `eval.reference_n` of the training set, with eval.inception_weights.
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

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dcgan import distributed, evaluate, files, metrics, runcard, runfolder, supervise, train
from dcgan.config import compose, is_search_path, validate_train
from dcgan.errors import USAGE_EXIT, UserError
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
    """Check, train and score one job; returns its objective, +inf (the worst) if it failed or diverged.

    `keep`: what Hydra wrote into the folder before the job (runfolder.hydra_record). Never exits: a
    failing job must not end the sweep. train.Stopped (SIGINT/SIGTERM) is left to the
    caller, since a stopped sweep should stop.
    """
    record: Dict[str, Any] = {"job": job, "folder": str(run_dir), "overrides": overrides}
    value: Optional[float] = FAILED
    try:
        distributed.adopt_submitit_tasks()  # a multi-task SLURM job: one DDP process per task
        validate_train(cfg)
        validate_sweep(cfg)
        if distributed.world().enabled:
            distributed.setup(cfg.trainer.device, cfg.trainer.dist_timeout_s)
        runfolder.take(run_dir, cfg, keep)
        row = supervise.supervise(train.train, cfg, run_dir)
        if distributed.world().is_main:
            value, measured = objective(cfg, run_dir, row)
            record.update(status="completed", **measured)
    except UserError as error:
        print(f"gan-train: job {job}: {error}", file=sys.stderr, flush=True)
        record.update(status="failed", error=str(error))
    except supervise.DivergedAndStopped as diverged:
        print(f"gan-train: job {job}: diverged: {diverged}", file=sys.stderr, flush=True)
        record.update(status="diverged", error=str(diverged))
    finally:
        runfolder.release_all()
        distributed.shutdown()
    if distributed.world().is_main:
        write_record(run_dir.parent, record)
    return value


def objective(cfg: DictConfig, run_dir: Path, row: Dict[str, Any]) -> Tuple[Optional[float], Dict[str, Any]]:
    """The job's score by sweep.objective, and what to record of it; also written to metrics and run card."""
    name, run = cfg.sweep.objective, RunFolder(run_dir)
    if name == "none":
        return None, {"objective": name}
    if name in metrics.METRICS:
        value, protocol = final_score(cfg, run, name)
    else:
        value = float(row[name])
        protocol = f"mean of {name} over the last {cfg.trainer.log_every} steps (step {row['step']})"
    measured = {"objective": name, "value": value, "protocol": protocol}
    with open(run.metrics, "a") as file:  # the run's last row: the score at its final step
        file.write(
            json.dumps({"step": row["step"], "epoch": row["epoch"], "sweep_objective": name, name: value}) + "\n"
        )
    runcard.update(run_dir, objective=measured)
    log.info("sweep.objective %s = %.6g (%s)", name, value, protocol)
    return value, measured


def final_score(cfg: DictConfig, run: RunFolder, name: str) -> Tuple[float, str]:
    """FID or KID of the last checkpoint, exactly as `gan-eval ckpt=... n=eval.n metrics=[NAME]` measures it."""
    last = run.checkpoints / "last.pt"
    settings = OmegaConf.merge(
        OmegaConf.structured(evaluate.EvalConfig),
        OmegaConf.to_container(cfg.eval),  # a MetricsConfig: its fields, not its type
        {"ckpt": str(last), "metrics": [name], "device": cfg.trainer.device},
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
    path = sweep_dir / JOBS / f"{Path(record['folder']).name}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write_text(path, json.dumps({**record, "ended": time.time()}, indent=2) + "\n")
    except OSError as error:  # the job's own files hold its result; the summary will lack this one
        log.warning("could not write the sweep record %s: %s", path, error)


# ---------------------------------------------------------------- before and after the sweep


# The Hydra plugins that a sweep's choices need, by (group, option): the module, and the extra that installs it.
OPTUNA = ("hydra_plugins.hydra_optuna_sweeper", "sweep")
SUBMITIT = ("hydra_plugins.hydra_submitit_launcher", "slurm")
PLUGINS = {
    ("hydra/sweeper", "optuna"): OPTUNA,
    ("hparams_search", "*"): OPTUNA,  # configs/hparams_search/ are Optuna searches
    ("hydra/launcher", "joblib"): ("hydra_plugins.hydra_joblib_launcher", "sweep"),
    **{("hydra/launcher", name): SUBMITIT for name in ("submitit_local", "submitit_slurm", "slurm_gpu", "slurm_ddp")},
}


def check_sweep(args: List[str]) -> None:
    """Before a sweep starts: the plugins its sweeper and launcher need are installed, and a grid's jobs each
    compose (check_jobs_compose)."""
    import importlib.util

    overrides = [a for a in args if not a.startswith("-")]
    for arg in overrides:
        group, _, option = arg.partition("=")
        module, extra = PLUGINS.get((group, option), PLUGINS.get((group, "*"), (None, None)))
        if module and importlib.util.find_spec(module) is None:
            raise UserError(f"{arg} needs the Hydra plugin {module.split('.')[-1]}: pip install 'dcgan[{extra}]'")
    if not any(a.startswith(("hydra/sweeper=", "hparams_search=")) for a in overrides):
        check_jobs_compose(overrides)  # another sweeper draws its own jobs, and Hydra checks its search space


def check_jobs_compose(overrides: List[str]) -> None:
    """A grid sweep's jobs (the basic sweeper), each composed before any runs: a value of the wrong type
    would otherwise end the sweep halfway, when Hydra composes that job. Values of the right type that a
    check refuses (a batch size of -1) fail their own job only, when it runs."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        job_overrides = [a for a in overrides if is_search_path(a) or not a.startswith("hydra")]
        parsed = OverridesParser.create().parse_overrides(job_overrides)
        batches = BasicSweeper.split_arguments(parsed, None)
    except Exception as error:  # Hydra's own parse errors: reported by Hydra itself when it runs
        log.debug("sweep not pre-checked: %s", error)
        return
    for job in [job for batch in batches for job in batch][:1000]:
        try:
            compose("train", list(job))
        except UserError as error:
            raise UserError(f"sweep job {' '.join(job)} can't be composed: {error}; no job was run") from None


class SweepSummary(Callback):
    """Hydra callback: when a sweep ends, its jobs' records as SWEEP_DIR/sweep_summary.json and .md, sorted by
    objective, failed jobs with their reason; the sweep exits 2 if any job failed on a usage error."""

    def __init__(self) -> None:
        self.started = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        # Before the sweeper starts: Optuna's storage (hparams_search/) lives in the sweep folder.
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        records = read_records(sweep_dir, self.started)
        if not records:
            return
        write_summary(sweep_dir, records)
        failed = [r for r in records if r.get("status") == "failed"]
        print(summary_line(records, sweep_dir), file=sys.stderr, flush=True)
        if failed:
            raise SystemExit(USAGE_EXIT)


def read_records(sweep_dir: Path, since: float) -> List[Dict[str, Any]]:
    """This sweep's job records (an earlier sweep into the same folder left older ones)."""
    records = []
    for path in sorted((sweep_dir / JOBS).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("ended", 0) >= since:
            records.append(record)
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
    counts = {status: sum(r.get("status") == status for r in records) for status in ("completed", "diverged", "failed")}
    failed = "; ".join(f"job {r['job']}: {r.get('error')}" for r in records if r.get("status") == "failed")
    said = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    return f"gan-train: sweep of {len(records)} jobs: {said}{' (' + failed + ')' if failed else ''}; " + (
        f"summary in {sweep_dir / SUMMARY}.md"
    )
