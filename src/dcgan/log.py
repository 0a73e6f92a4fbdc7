"""Training logs: a JSONL file of averaged metrics, progress with an ETA, the end-of-run summary and,
optionally, TensorBoard.

Per-step statistics arrive as device tensors and are summed on the device; they are read back
(one GPU sync) only every `log_every` steps, so logging never stalls the loop. With
`logger=[jsonl,tensorboard]` every row also goes to TensorBoard (in RUN_DIR/tensorboard/) as
scalars, and each fixed-noise grid as an image; TensorBoard is an optional package.

Progress (trainer.progress): in a terminal, a tqdm bar with its ETA; into a file or a pipe (SLURM, `| tee`),
where a redrawn bar would fill the log, one line per metrics row instead. Either way one line, a few steps
in, says how long the run will take at the speed measured so far.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from PIL import Image
from tqdm import tqdm

from dcgan import distributed, files
from dcgan.checkpoint import LAST
from dcgan.errors import UserError, one_of
from dcgan.layout import RunFolder

log = logging.getLogger(__name__)

# TensorBoard groups charts by the part of a tag before "/"; keys not listed keep their own name.
TENSORBOARD_TAGS = {
    "loss_d": "Loss/D",
    "loss_g": "Loss/G",
    "gradient_penalty": "Loss/gradient_penalty",
    "d_real": "D/real_score",  # D(x)
    "d_fake": "D/fake_score",  # D(G(z))
    "d_accuracy": "D/accuracy",
    "fid": "Metrics/FID",
    "kid": "Metrics/KID",
    "eval_s": "Speed/eval_s",
    "images_per_s": "Speed/images_per_s",
    "lr_g": "LearningRate/G",
    "lr_d": "LearningRate/D",
}

LOGGERS = ("jsonl", "tensorboard")

# The duration estimate times this many steps, after the first one (which pays for warm-up: allocations,
# cuDNN's autotuner, compilation). On a GPU the host runs ahead of the device only until the launch queue
# fills, a step or two, so the host's clock measures the device's speed here without a sync.
ESTIMATE_AFTER_STEPS = 5


def validate_loggers(loggers) -> None:
    for name in loggers:
        one_of("logger", name, LOGGERS)
    if "jsonl" not in loggers:
        raise UserError(
            f"logger must include jsonl (metrics.jsonl feeds gan-report and resume), got {list(loggers)}; "
            "e.g. logger=[jsonl,tensorboard]"
        )
    if "tensorboard" in loggers:
        import_summary_writer()  # fails here, before a run folder exists, when the package is missing


class MetricsLog:
    def __init__(
        self,
        path: Path,
        start_step: int,
        total_steps: int,
        images_per_step: int,
        show_progress: bool,
        loggers: Sequence[str] = ("jsonl",),
        optimizers: Optional[Mapping[str, torch.optim.Optimizer]] = None,
    ):
        """Rows go to `path` (RunFolder.metrics), TensorBoard events to the run folder's tensorboard/.

        `optimizers` by short name ({"g": opt_g}) add their learning rate to every row as lr_<name>.
        """
        self.path = path
        self.images_per_step = images_per_step
        # Under torchrun every rank averages its statistics with the others; only rank 0 writes.
        self.is_main = distributed.world().is_main
        self.optimizers = dict(optimizers or {})
        self.tensorboard = None
        if "tensorboard" in loggers and self.is_main:
            # On resume, purge_step hides events a crashed run logged after its checkpoint (as _truncate_after does).
            events = RunFolder(path.parent).tensorboard
            self.tensorboard = import_summary_writer()(str(events), purge_step=start_step + 1 if start_step else None)
        self._sums: Dict[str, torch.Tensor] = {}
        self._counts: Dict[str, int] = {}  # per statistic: some are measured on some steps only (lazy R1)
        self._count = 0
        self._clock = time.perf_counter()
        if self.is_main:
            self._truncate_after(start_step)
        # The bar goes to stderr: redrawn in a terminal, one line per row anywhere else.
        in_terminal = sys.stderr.isatty()
        self.progress_lines = show_progress and self.is_main and not in_terminal
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            disable=not (show_progress and self.is_main and in_terminal),
            unit="step",
            dynamic_ncols=True,
        )
        self.speed = Speed(start_step, total_steps, announce=show_progress and self.is_main)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint, so the file reads as one continuous run."""
        if not self.path.exists():
            return
        # A line cut short (a full disk or a power cut during the append) is dropped, not a crash at resume.
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if (logged := _logged_step(line)) is not None and logged <= step
        ]
        files.atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def add(self, stats: Dict[str, torch.Tensor]) -> None:
        """Accumulate one step's statistics (detached scalars; no sync)."""
        for key, value in stats.items():
            value = value.detach().float()
            self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()
            self._counts[key] = self._counts.get(key, 0) + 1
        self._count += 1
        self.bar.update(1)
        self.speed.step_done()

    def leave_out(self, seconds: float) -> None:
        """Time spent on something other than training (an evaluation): not counted in images_per_s."""
        self._clock += seconds

    def write(self, step: int, epoch: int, extra: Optional[Dict[str, float]] = None) -> Dict[str, float]:
        """Average what was accumulated since the last write, append it as a JSON line, show it."""
        if self._count == 0:
            return {}
        now = time.perf_counter()
        names = list(self._sums)
        # This is the loop's only CPU-GPU sync point.
        sums = distributed.sum_over_ranks(torch.stack([self._sums[k] for k in names]))
        counts = torch.tensor([self._counts[k] for k in names], dtype=sums.dtype, device=sums.device)
        values = sums.div(counts * distributed.world().size).tolist()
        row: Dict[str, float] = {"step": step, "epoch": epoch}
        row.update({k: round(v, 6) for k, v in zip(names, values, strict=False)})
        row["images_per_s"] = round(self._count * self.images_per_step / max(now - self._clock, 1e-9), 1)
        row.update({f"lr_{name}": optimizer.param_groups[0]["lr"] for name, optimizer in self.optimizers.items()})
        row.update(extra or {})
        self._sums, self._counts, self._count, self._clock = {}, {}, 0, now
        if not self.is_main:
            return row
        with open(self.path, "a") as file:
            file.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(TENSORBOARD_TAGS.get(key, key), value, step)
        shown = {k: f"{row[k]:.3g}" for k in ("loss_d", "loss_g", "d_real", "d_fake", "images_per_s") if k in row}
        self.bar.set_postfix(shown, refresh=False)
        if self.progress_lines:
            left = self.speed.seconds_left(step)
            eta = "" if left is None else f"  {duration(left)} left"
            fields = "  ".join(f"{key} {value}" for key, value in shown.items())
            log.info("step %d/%d  %s%s", step, self.speed.total_steps, fields, eta)
        return row

    def add_grid(self, grid: Image.Image, step: int) -> None:
        """Show a fixed-noise grid (as saved in samples/) in TensorBoard's image tab."""
        if self.tensorboard is not None:
            self.tensorboard.add_image(
                "samples/fixed_noise", np.asarray(grid), step, dataformats="HW" if grid.mode == "L" else "HWC"
            )

    def close(self) -> None:
        self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def last_training_row(path: Path) -> Dict[str, Any]:
    """The newest row with losses in a metrics file ({} if none): what a run that had no step left to train
    reports (a finished sweep job continued with trainer.resume=auto)."""
    if not path.exists():
        return {}
    rows = [row for line in path.read_text().splitlines() if (row := _parse_row(line)) is not None]
    return next((row for row in reversed(rows) if "loss_g" in row), {})


class Speed:
    """The run's measured speed: a one-time estimate of its duration, then the time left at each row."""

    def __init__(self, start_step: int, total_steps: int, announce: bool):
        self.start_step, self.total_steps, self.announce = start_step, total_steps, announce
        self.done = 0  # steps taken in this invocation
        self.first_step_end: Optional[float] = None  # the clock starts after the warm-up step

    def step_done(self) -> None:
        self.done += 1
        if self.done == 1:
            self.first_step_end = time.perf_counter()
        elif self.done == 1 + ESTIMATE_AFTER_STEPS and self.announce:
            step = self.start_step + self.done
            seconds_per_step = self._seconds_per_step()
            log.info(
                "speed: %.3g s/step over steps %d-%d, so about %s for the %d steps left",
                seconds_per_step,
                step - ESTIMATE_AFTER_STEPS + 1,
                step,
                duration(seconds_per_step * (self.total_steps - step)),
                self.total_steps - step,
            )

    def _seconds_per_step(self) -> float:
        return (time.perf_counter() - self.first_step_end) / (self.done - 1)

    def seconds_left(self, step: int) -> Optional[float]:
        """At the speed since the first step of this invocation; None before two steps were taken."""
        if self.done < 2:
            return None
        return self._seconds_per_step() * (self.total_steps - step)


def duration(seconds: float) -> str:
    """42 s, 12 min, 3 h 05 min."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min"


def log_summary(run_dir: Path, step: int, minutes: float, written: Sequence[Path], classes: Sequence[str] = ()) -> None:
    """The block gan-train ends with: where the run's files are, and the commands to run next (a log record);
    `classes`: a conditional run's class names."""
    run = RunFolder(run_dir)
    last = run.checkpoints / LAST
    grids = run.grids()
    lines = [f"done: step {step} after {duration(minutes * 60)} of training", f"  run folder       {shown(run.root)}"]
    if last.is_file():
        lines.append(f"  last checkpoint  {shown(last)}")
    if grids:
        lines.append(f"  grids            {shown(run.samples)}/ ({len(grids)}: {grids[0].name} ... {grids[-1].name})")
    if written:
        lines.append(f"  report           {', '.join(shown(path) for path in written)}")
    lines.append("next:")
    if last.is_file():
        lines.append(f"  gan-sample ckpt={shown(last)} scale=4 out=grid.png      # 64 new images")
        if classes:
            lines.append(f"  gan-sample ckpt={shown(last)} mode=classes out=classes.png      # a row per class")
            one_class = class_argument(classes, len(classes) - 1)
            lines.append(f"  gan-sample ckpt={shown(last)} {one_class} out=one_class.png")
    lines.append(f"  gan-report run={shown(run.root)}      # the figures again, e.g. after a resume")
    # Logged, not printed: gan-train shows it (and keeps it in RUN_DIR/train.log); a script calling train() decides.
    log.info("%s", "\n".join(lines))


def class_argument(classes: Sequence[str], index: int) -> str:
    """gan-sample's `class=` for class `index`, as a shell word: by its name where Hydra reads the name back
    unquoted as itself, else by its index (Hydra's unquoted values refuse letters outside ASCII, commas, ...)."""
    name = classes[index]
    try:
        typed = OverridesParser.create().parse_override(f"class={name}").value()
    except HydraException:
        typed = None
    return shlex.quote(f"class={name}") if str(typed) == name else f"class={index}"


def shown(path: Path) -> str:
    """A path as short as it can be and still be pasted: relative to the working directory when under it."""
    path = Path(os.path.abspath(path))
    try:
        path = path.relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.quote(str(path))


def _logged_step(line: str) -> Optional[int]:
    row = _parse_row(line)
    return None if row is None else int(row["step"])


def _parse_row(line: str) -> Optional[dict]:
    """A metrics row, or None for a line that is not one (cut short, damaged)."""
    try:
        row = json.loads(line)
        int(row["step"])
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    return row


def import_summary_writer():
    """torch's TensorBoard `SummaryWriter` class, or a UserError saying how to install TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it when the tensorboard package is missing
        raise UserError(
            "logger=[jsonl,tensorboard] needs the tensorboard package: pip install 'dcgan[tensorboard]' "
            "(or pip install tensorboard), or leave tensorboard out of logger"
        ) from None
    return SummaryWriter


def all_finite(row: Dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in row.values() if isinstance(v, float))


def read_metrics(path: Path) -> list:
    """The rows of a metrics.jsonl. A line that is no row (cut short when a run was killed mid-append, or
    damaged) is skipped with a warning, as resume does: the other rows are still worth a figure."""
    rows, bad_lines = [], []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        row = _parse_row(line)
        if row is None:
            bad_lines.append(number)
        else:
            rows.append(row)
    if bad_lines:
        shown = ", ".join(map(str, bad_lines[:5])) + (" ..." if len(bad_lines) > 5 else "")
        log.warning(
            "%s: skipped %d line(s) that are not metrics rows (line %s; cut short by a killed run?)",
            path,
            len(bad_lines),
            shown,
        )
    return rows
