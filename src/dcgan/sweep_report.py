"""One page comparing the jobs of a sweep (`gan-report sweep=DIR`): the study's result, from what the jobs wrote.

A sweep folder is what `gan-train -m` leaves (a study, `+study=NAME`, is one): a folder per job with its
metrics.jsonl, run_card.json and .hydra/, and sweep_jobs/ with each job's record (sweep.py). Nothing is
measured here: every number on the page is read from those files, so the page can be written again at any
time, for any sweep folder, ours or a user's.

  SWEEP_DIR/sweep_report.md    (or out=PATH)  the jobs best first: what differs between them, the objective,
                               FID/KID at each evaluation, images seen, minutes of training (summed over
                               a job's invocations), D's accuracy, a conditional job's intra-class FID, how
                               each ended (failed and diverged jobs with why); then the command, device,
                               code revision and date
  sweep_fid.png  (beside the page, or results/<page>_fid.png beside out=)   FID against minutes of training
                               and against images seen, a line per job (needs matplotlib)

Jobs are ranked by the objective each returned to the sweeper (sweep.objective); where that is `none`, by the
last FID (else KID) measured along the run (trainer.eval_every*).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from dcgan import files
from dcgan.errors import UserError
from dcgan.log import read_metrics

log = logging.getLogger(__name__)

PAGE = "sweep_report.md"
PLOT = "sweep_fid.png"
JOB_RECORDS = "sweep_jobs"  # sweep.JOBS: SWEEP_DIR/sweep_jobs/<job folder>.json


@dataclass
class Job:
    """One job of the sweep, as its files tell it."""

    folder: Path
    overrides: List[str]
    status: str  # completed | diverged | failed | time limit | ... (the record, else the run card)
    reason: str = ""
    objective: str = ""
    value: Optional[float] = None  # what the job returned to the sweeper
    evaluations: List[Dict[str, Any]] = field(default_factory=list)  # metrics rows with FID/KID, + "images"
    last: Dict[str, Any] = field(default_factory=dict)  # the last training row (step, minutes, d_accuracy, ...)
    images_per_step: int = 0
    card: Dict[str, Any] = field(default_factory=dict)
    intra_class: Dict[str, Any] = field(default_factory=dict)  # a conditional job's intra-class FID (last.eval.json)

    @property
    def score(self) -> Tuple[str, Optional[float]]:
        """(what ranks it, its value): the sweep objective, else the last FID/KID along the run."""
        if self.value is not None and math.isfinite(self.value):
            return self.objective, self.value
        for metric in ("fid", "kid"):
            values = [row[metric] for row in self.evaluations if metric in row]
            if values:
                return f"last {metric}", values[-1]
        return "", None


# ---------------------------------------------------------------- reading a sweep folder


def read_sweep(sweep_dir: Path) -> List[Job]:
    """Every job folder under `sweep_dir` (one with .hydra/ or metrics.jsonl), with its record when there is one."""
    records = read_records(sweep_dir)
    folders = sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or (p / "metrics.jsonl").is_file())),
        key=lambda p: (len(p.name), p.name),
    )
    return [read_job(folder, records.get(folder.name, {})) for folder in folders]


def read_records(sweep_dir: Path) -> Dict[str, Dict[str, Any]]:
    """The newest sweep record of each job folder, by folder name (a rerun into the folder writes a newer one)."""
    records: Dict[str, Dict[str, Any]] = {}
    for path in sorted((sweep_dir / JOB_RECORDS).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            log.warning("skipped the unreadable job record %s", path)
            continue
        name = Path(record.get("folder", path.stem)).name
        if record.get("ended", 0) >= records.get(name, {}).get("ended", 0):
            records[name] = record
    return records


def read_job(folder: Path, record: Dict[str, Any]) -> Job:
    card = read_json(folder / "run_card.json")
    trainer = read_yaml(folder / ".hydra" / "config.yaml").get("trainer", {})
    per_step = int(trainer.get("batch_size", 0)) * int(trainer.get("d_steps", 1))
    rows = read_metrics(folder / "metrics.jsonl") if (folder / "metrics.jsonl").is_file() else []
    training = run_minutes([row for row in rows if "sweep_objective" not in row])  # sweep.py's last row: the score
    evaluations = [{**row, "images": row["step"] * per_step} for row in training if "fid" in row or "kid" in row]
    overrides = record.get("overrides") or read_yaml(folder / ".hydra" / "overrides.yaml") or []
    status = record.get("status") or card.get("status") or "no record"
    value = record.get("value")
    return Job(
        folder=folder,
        overrides=[str(o) for o in overrides],
        status=status,
        reason=record.get("error", ""),
        objective=record.get("objective", ""),
        value=float(value) if isinstance(value, (int, float)) else None,
        evaluations=evaluations,
        last=training[-1] if training else {},
        images_per_step=per_step,
        card=card,
        intra_class=intra_class_fid(folder / "checkpoints" / "last.eval.json"),
    )


def run_minutes(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The rows with `minutes` counted from the run's start: a row's minutes are this invocation's training, so
    a job continued with trainer.resume=auto (a later slot, a sweep run again) counts from 0 again; each earlier
    invocation's last logged minutes are added to the rows after it."""
    offset, previous, counted = 0.0, 0.0, []
    for row in rows:
        if "minutes" in row:
            if row["minutes"] < previous:  # a new invocation began
                offset += previous
            previous = row["minutes"]
            row = {**row, "minutes": row["minutes"] + offset}
        counted.append(row)
    return counted


def intra_class_fid(stamp: Path) -> Dict[str, Any]:
    """The intra-class FID result of gan-eval's stamp (a conditional job scored with sweep.objective=fid), or {}."""
    content = read_json(stamp)
    results = content.get("results") if isinstance(content, dict) else None
    return next((r for r in results or [] if isinstance(r, dict) and r.get("metric") == "intra_class_fid"), {})


def read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


# ---------------------------------------------------------------- the page


def ranked(jobs: List[Job]) -> List[Job]:
    """Best (lowest) score first; jobs without one (failed, diverged, never scored) last, in folder order."""

    def order(job: Job) -> Tuple[int, float]:
        value = job.score[1]
        return (0, value) if value is not None and math.isfinite(value) else (1, 0.0)

    return sorted(jobs, key=order)


def differing(jobs: List[Job]) -> Dict[Path, str]:
    """Each job's overrides that not every job shares: what the sweep varied."""
    common = set.intersection(*(set(job.overrides) for job in jobs)) if jobs else set()
    return {job.folder: " ".join(o for o in job.overrides if o not in common) or "(none)" for job in jobs}


def along_the_run(job: Job) -> str:
    """`1.0 min, 12,800 img: 45.2` for every evaluation of the run (FID, else KID x 10^3)."""
    points = []
    for row in job.evaluations:
        value = f"{row['fid']:.2f}" if "fid" in row else f"{1000 * row['kid']:.2f}e-3 KID"
        points.append(f"{row.get('minutes', 0):.2f} min, {row['images']:,} img: {value}")
    return "; ".join(points) or "-"


def cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table_lines(jobs: List[Job]) -> List[str]:
    varied = differing(jobs)
    lines = [
        "| rank | job | what differs | ended | objective | FID (KID) along the run: minutes, images seen: value "
        "| images seen | minutes | D accuracy | intra-class FID: mean (worst class) | why it failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rank, job in enumerate(jobs, 1):
        name, value = job.score
        shown = f"{name} {value:.4g}" if value is not None and math.isfinite(value) else "-"
        images = job.last.get("step", 0) * job.images_per_step
        accuracy = f"{job.last['d_accuracy']:.2f}" if "d_accuracy" in job.last else "-"
        minutes = f"{job.last['minutes']:.2f}" if "minutes" in job.last else "-"
        cells = [rank, f"`{job.folder.name}`", f"`{varied[job.folder]}`", job.status, shown, along_the_run(job)]
        cells += [f"{images:,}", minutes, accuracy, intra_class_cell(job.intra_class), job.reason or ""]
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return lines


def intra_class_cell(result: Dict[str, Any]) -> str:
    try:
        worst = result["worst"]
        return f"{result['mean']:.2f} ({worst['class']} {worst['value']:.2f})"
    except (KeyError, TypeError):
        return "-"


def about_lines(sweep_dir: Path, jobs: List[Job]) -> List[str]:
    """Command, device, code revision, versions and date: where every number on the page came from."""
    card = next((job.card for job in jobs if job.card), {})
    command = card.get("command") or []
    program = Path(command[0]).name if command else "gan-train"
    git = card.get("git") or {}
    revision = f"{git.get('revision', 'unknown')[:12]}{' (with uncommitted changes)' if git.get('dirty') else ''}"
    versions = card.get("versions") or {}
    started = min((job.card.get("started", "") for job in jobs if job.card.get("started")), default="unknown")
    ended = max((job.card.get("ended", "") for job in jobs if job.card.get("ended")), default="unknown")
    return [
        f"- **Command:** `{shlex.join([program, *command[1:]]) if command else 'unknown (no run card)'}`",
        f"- **Device:** {card.get('device', 'unknown')}, host `{card.get('host', '?')}`; torch "
        f"{versions.get('torch', '?')}, dcgan {versions.get('dcgan', '?')}, code at {revision}",
        f"- **Date:** jobs ran from {started} to {ended}; page written {datetime.date.today().isoformat()} by "
        f"`gan-report sweep={sweep_dir}`",
        f"- **Jobs:** {len(jobs)}: " + ", ".join(f"{n} {s}" for s, n in status_counts(jobs).items()),
    ]


def status_counts(jobs: List[Job]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for job in jobs:
        counts[job.status] = counts.get(job.status, 0) + 1
    return counts


def write_page(sweep_dir: Path, out: Optional[Path] = None, title: str = "") -> List[Path]:
    """The page (and the plot when matplotlib is there) for the sweep in `sweep_dir`; returns the files written."""
    jobs = ranked(read_sweep(sweep_dir))
    if not jobs:
        raise UserError(f"{sweep_dir} holds no job folders (none with .hydra/ or metrics.jsonl): is it a sweep folder?")
    page = out or sweep_dir / PAGE
    plot_path = page.parent / (PLOT if out is None else f"results/{page.stem}_fid.png")
    plotted = plot_fid(jobs, plot_path)
    lines = [f"# {title or 'Sweep: ' + sweep_dir.name}", "", *about_lines(sweep_dir, jobs), "", *table_lines(jobs), ""]
    if plotted is not None:
        lines += [f"![FID against minutes and images seen]({plotted.relative_to(page.parent).as_posix()})", ""]
    elif any(job.evaluations for job in jobs):
        lines += ["(No plot: matplotlib is not installed here; pip install 'dcgan[report]'.)", ""]
    page.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(page, "\n".join(lines))
    return [page] + ([plotted] if plotted is not None else [])


def plot_fid(jobs: List[Job], path: Path) -> Optional[Path]:
    """FID against minutes of training and against images seen, a line per job; None without data or matplotlib."""
    metric = "fid" if any("fid" in row for job in jobs for row in job.evaluations) else "kid"
    scored = [job for job in jobs if any(metric in row for row in job.evaluations)]
    if not scored:
        return None
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.info("matplotlib is not installed, so %s is skipped (pip install 'dcgan[report]')", path.name)
        return None
    varied = differing(jobs)
    figure = Figure(figsize=(11, 4), dpi=100, layout="constrained")
    axes_pair = figure.subplots(1, 2)
    x_axes = (("minutes", "minutes of training"), ("images", "images seen"))
    for axes, (x_key, label) in zip(axes_pair, x_axes, strict=True):
        for job in scored:
            points = [(row.get(x_key, 0), row[metric]) for row in job.evaluations if metric in row]
            axes.plot(*zip(*points, strict=True), marker="o", label=varied[job.folder][:40])
        axes.set_xlabel(label)
        axes.set_ylabel(f"{metric.upper()} (lower is better)")
        axes.grid(alpha=0.3)
    axes_pair[1].legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    return files.atomic_write(path, lambda file: figure.savefig(file, format="png"))
