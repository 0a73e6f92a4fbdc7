"""Figures of a training run (`gan-report run=DIR`; gan-train also writes them when it ends), and the page of a
sweep (`gan-report sweep=DIR`: sweep_report.py).

  loss_curves.png   losses, D(x) and D(G(z)), D's accuracy, FID/KID when measured, learning rates
                    and speed against the step, from metrics.jsonl (matplotlib)
  progress.gif      the fixed-noise grids of samples/ in step order, from step 0 (the untrained G):
                    the same 64 latents as training goes on (Pillow)

matplotlib is a base dependency: a chart with axes, ticks and legends is what it is for, and drawing one
by hand would be a second, poorer plotting library to keep. Both files are replaced atomically, so a
viewer never sees half a file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from PIL import Image, ImageDraw

from dcgan import files, sweep_report
from dcgan.errors import UserError, at_most, check_writable_folder
from dcgan.images import MAX_GIF_FPS, save_gif
from dcgan.layout import RunFolder, grid_step
from dcgan.log import read_metrics


@dataclass
class ReportConfig:
    run: str = ""  # a gan-train run folder: reads metrics.jsonl and samples/, writes the figures there
    sweep: str = ""  # or a sweep folder (gan-train -m): one page comparing its jobs (sweep_report.py)
    out: str = ""  # sweep: the page's path (default SWEEP_DIR/sweep_report.md), e.g. docs/RESULTS_gpu.md
    title: str = ""  # sweep: the page's title (default "Sweep: <folder name>")
    fps: int = 4  # progress movie frame rate
    max_frames: int = 100  # progress movie: at most this many grids, evenly spaced (the first and last kept)


log = logging.getLogger(__name__)
# matplotlib notes on the log when it can't keep its font cache (a full or read-only home): its business, not
# the user's; the chart is drawn either way.
logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)

FINAL_FRAME_MS = 2000  # the last grid stays up a while before the movie loops
CAPTION_PX = 14  # height of the "step N" band under each frame

# One chart per panel, drawn only when metrics.jsonl has one of its keys (FID and KID come from
# trainer.eval_every, the gradient penalty from wgan_gp).
PANELS = (
    ("Losses", ("loss_d", "loss_g", "gradient_penalty")),
    ("D's outputs", ("d_real", "d_fake")),
    ("D's accuracy", ("d_accuracy",)),
    ("FID (lower is better)", ("fid",)),
    ("KID (lower is better)", ("kid",)),
    ("Learning rate", ("lr_g", "lr_d")),
    ("Speed (images/s)", ("images_per_s",)),
)
LABELS = {
    "loss_d": "D loss",
    "loss_g": "G loss",
    "gradient_penalty": "gradient penalty",
    "d_real": "D(x)",
    "d_fake": "D(G(z))",
    "d_accuracy": "accuracy",
    "lr_g": "G",
    "lr_d": "D",
}


def write_report(run_dir: Path, fps: int = ReportConfig.fps, max_frames: int = ReportConfig.max_frames) -> List[Path]:
    """Write the loss-curve figure and the progress movie into `run_dir`; returns the files written."""
    run = RunFolder(run_dir)
    written = []
    rows = read_metrics(run.metrics) if run.metrics.is_file() else []
    if rows:
        written.append(plot_metrics(rows, run.loss_figure))
    grids = run.grids()
    if grids:
        written.append(write_progress_movie(grids, run.progress_movie, fps, max_frames))
    return written


def plot_metrics(rows: List[Dict[str, float]], path: Path) -> Path:
    """One chart per panel that has data, three to a row."""
    # The object-oriented API, not pyplot: no GUI backend and no global figure state. Imported here, as it
    # costs a few tenths of a second that commands other than reports need not pay.
    from matplotlib.figure import Figure

    panels = [(title, [key for key in keys if any(key in row for row in rows)]) for title, keys in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    columns = min(3, len(panels))
    lines = -(-len(panels) // columns)
    figure = Figure(figsize=(4 * columns, 3.2 * lines), dpi=100, layout="constrained")
    all_axes = figure.subplots(lines, columns, squeeze=False).flatten()
    for axes in all_axes[len(panels) :]:
        axes.set_visible(False)
    for axes, (title, keys) in zip(all_axes, panels, strict=False):
        for key, style in zip(
            keys, ("-", "--", ":"), strict=False
        ):  # dashes keep equal curves (G's and D's lr) both visible
            points = [(row["step"], row[key]) for row in rows if key in row]  # FID is measured on fewer rows
            axes.plot(
                *zip(*points, strict=False), style, label=LABELS.get(key, key), marker="o" if len(points) < 20 else None
            )
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if len(keys) > 1:
            axes.legend()
    return files.atomic_write(path, lambda file: figure.savefig(file, format="png"))


def write_progress_movie(grids: Sequence[Path], path: Path, fps: int, max_frames: int) -> Path:
    """An animated GIF of the grids, each captioned with its step; at most `max_frames`, evenly spaced."""
    if len(grids) > max_frames:
        last = len(grids) - 1
        grids = (
            [grids[round(i * last / (max_frames - 1))] for i in range(max_frames)] if max_frames > 1 else [grids[-1]]
        )
    frames = [captioned(image, f"step {grid_step(grid):,}") for grid, image in read_grids(grids)]
    durations = [round(1000 / fps)] * (len(frames) - 1) + [FINAL_FRAME_MS]
    save_gif(frames, path, durations)
    return path


def read_grids(grids: Sequence[Path]) -> List[Tuple[Path, Image.Image]]:
    """The grids that decode; damaged ones are skipped with one warning, so they cost frames, not the movie."""
    readable, damaged = [], []
    for grid in grids:
        try:
            with Image.open(grid) as image:
                image.load()
                readable.append((grid, image.copy()))
        except Exception as error:  # Pillow fails in many ways on a damaged file
            damaged.append(f"{grid.name} ({type(error).__name__}: {error})")
    if not readable:
        raise UserError(
            f"none of the grids in {grids[0].parent} can be read ({damaged[0]}); delete the damaged step_*.png files"
        )
    if damaged:
        log.warning("skipped %d damaged grid(s) in %s: %s", len(damaged), grids[0].parent, ", ".join(damaged[:5]))
    return readable


def captioned(grid: Image.Image, caption: str) -> Image.Image:
    """The grid over a black band with white `caption` text."""
    grid = grid.convert("L" if grid.mode in ("L", "P", "1") else "RGB")
    frame = Image.new(grid.mode, (grid.width, grid.height + CAPTION_PX), 0)
    frame.paste(grid, (0, 0))
    ImageDraw.Draw(frame).text((4, grid.height + 1), caption, fill="white")
    return frame


def run(cfg: ReportConfig) -> List[Path]:
    if cfg.run and cfg.sweep:
        raise UserError("pass either run=DIR (one run's figures) or sweep=DIR (a sweep's page), not both")
    if cfg.sweep:
        return sweep_page(cfg)
    if not cfg.run:
        raise UserError(
            "no folder given: pass run=DIR (the hydra.run.dir of a gan-train run) or sweep=DIR (of gan-train -m)"
        )
    if cfg.fps < 1 or cfg.max_frames < 1:
        raise UserError(f"fps and max_frames must be >= 1, got fps={cfg.fps} max_frames={cfg.max_frames}")
    at_most("fps", cfg.fps, MAX_GIF_FPS, "a GIF plays frames at most 50 a second (browsers slow faster ones to 10)")
    run = RunFolder(cfg.run)
    if not run.metrics.is_file() and not run.grids():
        raise UserError(
            f"{run.root} has no {run.metrics.name} and no {run.samples.name}/step_*.png: is it a gan-train run folder?"
        )
    check_writable_folder("run", run.root)  # the figures go into the run folder
    with files.write_errors_as_user_errors("free some disk space on the run's disk (the figures go into the run)"):
        return write_report(run.root, cfg.fps, cfg.max_frames)


def sweep_page(cfg: ReportConfig) -> List[Path]:
    sweep_dir = Path(cfg.sweep)
    if not sweep_dir.is_dir():
        raise UserError(f"sweep={cfg.sweep} is not a folder; pass the hydra.sweep.dir of a gan-train -m sweep")
    out = Path(cfg.out) if cfg.out else None
    if out is not None and out.suffix != ".md":
        raise UserError(f"out={cfg.out}: the sweep's page is Markdown; give a path ending in .md")
    out_folder = out.parent if out is not None else sweep_dir
    if out_folder.is_dir():
        check_writable_folder("out" if out else "sweep", out_folder)
    return sweep_report.write_page(sweep_dir, out, cfg.title)
