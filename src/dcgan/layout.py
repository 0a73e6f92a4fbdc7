"""The run folder's layout: the one place that names what a run keeps where.

    RUN_DIR/
      checkpoints/      last.pt, step_NNNNNN.pt, best.pt (checkpoint.py names these), best.eval.json,
                        suspect/ (checkpoints set aside after a divergence)
      samples/          step_NNNNNN.png: the fixed-noise grid every trainer.sample_every steps
      metrics.jsonl     one row of averaged metrics every trainer.log_every steps
      run_card.json     how the run was started and how it ended (runcard.py)
      tensorboard/      with logger=[jsonl,tensorboard]
      loss_curves.png   gan-report's figure, and
      progress.gif      its movie of the grids
      .lock             the owner's flock (runfolder.py)
      replaced/         earlier runs moved aside by trainer.overwrite=true

gan-train, gan-report, gan-eval, gan-sample and the scripts all find these files through `RunFolder`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List

GRID_NAME = re.compile(r"^step_(\d+)\.png$")


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run's files; `RunFolder(run_dir).metrics` is RUN_DIR/metrics.jsonl, and so on."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))  # a str works too

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def suspect(self) -> Path:
        return self.checkpoints / "suspect"

    @property
    def best_stamp(self) -> Path:
        """The FID/KID results best.pt was kept for (trainer.eval_every)."""
        return self.checkpoints / "best.eval.json"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    def grid(self, step: int) -> Path:
        """The fixed-noise grid saved at `step`."""
        return self.samples / f"step_{step:06d}.png"

    def grids(self) -> List[Path]:
        """The fixed-noise grids that exist, in step order."""
        if not self.samples.is_dir():
            return []
        found = [(grid_step(path), path) for path in self.samples.iterdir() if GRID_NAME.match(path.name)]
        return [path for _, path in sorted(found)]

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def card(self) -> Path:
        return self.root / "run_card.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def loss_figure(self) -> Path:
        return self.root / "loss_curves.png"

    @property
    def progress_movie(self) -> Path:
        return self.root / "progress.gif"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def replaced(self) -> Path:
        return self.root / "replaced"

    def holds_a_run(self) -> bool:
        """Anything a gan-train run writes: a checkpoint, a metrics row, a grid, a run card."""
        return (
            any(self.checkpoints.glob("*.pt"))
            or (self.metrics.is_file() and self.metrics.stat().st_size > 0)
            or any(self.samples.glob("*.png"))
            or self.card.is_file()
        )


def grid_step(path: Path) -> int:
    """The step of a samples/step_NNNNNN.png grid."""
    return int(GRID_NAME.match(path.name).group(1))
