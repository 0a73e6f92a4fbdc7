"""What a run shows: TensorBoard scalars and grids, the loss-curve figure and the progress movie."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dcgan import cli, report
from dcgan.config import UserError, compose, validate_train
from dcgan.layout import RunFolder
from dcgan.log import MetricsLog

from conftest import FAST, run_cli

STEPS = [5, 10, 11]  # metrics rows: log_every=5 over 11 steps, and the last step
GRID_STEPS = [0, 2, 4, 6, 8, 10, 11]  # the untrained G's, sample_every=2, and the last step's
GRID_PX = 8 * 30 + 2  # 8x8 grid of 28 px images with 2 px padding
# matplotlib's first two line colours ("tab:blue", "tab:orange"): D's and G's curves.
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    result = run_cli(
        "gan-train",
        [
            *FAST,
            "trainer.progress=true",  # into a pipe: progress lines, no bar
            "trainer.max_steps=11",
            "trainer.sample_every=2",
            "logger=[jsonl,tensorboard]",
            f"hydra.run.dir={root / 'run'}",
        ],
        cwd=root,
    )
    (root / "stdout.txt").write_text(result.stdout)
    (root / "stderr.txt").write_text(result.stderr)
    return root / "run"


def metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def pixels_of(image: np.ndarray, colour: tuple) -> int:
    return int((np.abs(image[..., :3].astype(int) - colour).max(axis=-1) <= 10).sum())


def test_tensorboard_gets_the_scalars_and_the_grids(run_dir: Path):
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    rows = metrics(run_dir)
    assert [row["step"] for row in rows] == STEPS
    for tag, key in [
        ("Loss/D", "loss_d"),
        ("Loss/G", "loss_g"),
        ("D/real_score", "d_real"),
        ("D/fake_score", "d_fake"),
        ("D/accuracy", "d_accuracy"),
        ("Speed/images_per_s", "images_per_s"),
        ("LearningRate/G", "lr_g"),
        ("LearningRate/D", "lr_d"),
    ]:
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == STEPS, tag
        assert [s.value for s in scalars] == pytest.approx([row[key] for row in rows], rel=1e-6), tag
    assert rows[-1]["lr_g"] == pytest.approx(2e-4)
    images = events.Images("samples/fixed_noise")
    assert [i.step for i in images] == GRID_STEPS
    shown = Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("L")
    saved = Image.open(run_dir / "samples" / "step_000011.png")
    assert np.array_equal(np.asarray(shown), np.asarray(saved))


def test_a_run_into_a_pipe_logs_lines_not_a_bar_and_ends_saying_where_everything_is(run_dir: Path):
    """Under SLURM or `| tee`: one line per metrics row with the time left, one duration estimate a few steps
    in, no bar redraws; then the summary block with paths relative to where gan-train ran."""
    out, err = (run_dir.parent / "stdout.txt").read_text(), (run_dir.parent / "stderr.txt").read_text()
    assert "\r" not in out + err and len(out + err) < 4000  # a redrawn bar would write a line per step
    progress = [line.split(" - ", 1)[1] for line in out.splitlines() if "[dcgan.log][INFO]" in line]
    assert [line.split()[1] for line in progress if line.startswith("step ")] == [f"{step}/11" for step in STEPS]
    assert all(line.endswith(" left") for line in progress if line.startswith("step ") and "/11" in line)
    (estimate,) = [line for line in progress if line.startswith("speed: ")]
    assert re.fullmatch(r"speed: [0-9.e+-]+ s/step over steps 2-6, so about \d+ s for the 5 steps left", estimate)
    summary = out[out.index("done: step 11 after ") :].splitlines()
    assert summary[1:] == [
        "  run folder       run",
        "  last checkpoint  run/checkpoints/last.pt",
        f"  grids            run/samples/ ({len(GRID_STEPS)}: step_000000.png ... step_000011.png)",
        "  report           run/loss_curves.png, run/progress.gif",
        "next:",
        "  gan-sample ckpt=run/checkpoints/last.pt scale=4 out=grid.png      # 64 new images",
        "  gan-report run=run      # the figures again, e.g. after a resume",
    ]
    # The last row's minutes were read at the last step, not carried over from the row before it.
    rows = metrics(run_dir)
    assert rows[-1]["minutes"] > rows[-2]["minutes"] > 0


def test_the_end_of_a_run_writes_the_figure_and_the_movie(run_dir: Path):
    figure = np.asarray(Image.open(RunFolder(run_dir).loss_figure).convert("RGB"))
    # Five panels (losses, D's outputs, D's accuracy, learning rate, speed) in a 3 x 2 layout of 4 x 3.2 inch charts.
    assert figure.shape == (640, 1200, 3)
    assert pixels_of(figure, BLUE) > 500 and pixels_of(figure, ORANGE) > 200  # curves were drawn
    movie = Image.open(RunFolder(run_dir).progress_movie)
    frames = [np.asarray(frame.convert("L")) for frame in ImageSequence.Iterator(movie)]
    assert len(frames) == len(GRID_STEPS) and movie.size == (GRID_PX, GRID_PX + report.CAPTION_PX)
    for frame, step in zip(frames, GRID_STEPS, strict=False):  # each frame is that step's grid, above its caption
        assert np.array_equal(frame[:GRID_PX], np.asarray(Image.open(run_dir / "samples" / f"step_{step:06d}.png")))
        assert frame[GRID_PX:].max() > 128  # the white "step N" text


def test_gan_report_rewrites_them_on_demand(run_dir: Path, tmp_path: Path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "*.png", "*.gif"))
    shutil.copytree(run_dir / "samples", copy / "samples", dirs_exist_ok=True)
    result = run_cli("gan-report", [f"run={copy}", "fps=10", "max_frames=3"], cwd=tmp_path)
    assert "loss_curves.png" in result.stdout and "progress.gif" in result.stdout
    assert Image.open(RunFolder(copy).loss_figure).size == (1200, 640)
    movie = Image.open(RunFolder(copy).progress_movie)
    durations = [frame.info["duration"] for frame in ImageSequence.Iterator(movie)]
    assert durations == [100, 100, report.FINAL_FRAME_MS]  # 3 of the 7 grids, evenly spaced: steps 0, 6 and 11
    for index, step in enumerate((0, 6, 11)):
        movie.seek(index)
        shown = np.asarray(movie.convert("L"))[:GRID_PX]
        assert np.array_equal(shown, np.asarray(Image.open(copy / "samples" / f"step_{step:06d}.png"))), step


def test_gan_report_refuses_a_folder_that_is_not_a_run(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.report_main([f"run={tmp_path}"])
    error = capsys.readouterr().err
    assert exit.value.code == 2 and "is it a gan-train run folder" in error and len(error.strip().splitlines()) == 1


def test_tensorboard_asked_for_but_missing_is_a_clear_error(tmp_path: Path, monkeypatch, capsys):
    for name in [name for name in sys.modules if name.startswith(("tensorboard", "torch.utils.tensorboard"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit:
        cli.train_main([*FAST, "trainer.max_steps=2", "logger=[jsonl,tensorboard]", f"hydra.run.dir={run_dir}"])
    error = capsys.readouterr().err
    assert exit.value.code == 2 and "pip install 'dcgan[tensorboard]'" in error and "Traceback" not in error
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "loggers, message",
    [
        ("[tensorboard]", "logger must include jsonl"),
        ("[jsonl,wandb]", "logger must be one of jsonl, tensorboard"),
    ],
)
def test_logger_list_is_checked(loggers: str, message: str):
    with pytest.raises(UserError, match=message):
        validate_train(compose("train", [f"logger={loggers}"]))


def test_jsonl_alone_writes_no_tensorboard_folder(tmp_path: Path):
    log = MetricsLog(tmp_path / "metrics.jsonl", 0, 1, 1, show_progress=False)
    log.close()
    assert compose("train", []).logger == ["jsonl"]
    assert not (tmp_path / "tensorboard").exists()


def test_fid_when_measured_reaches_tensorboard_and_the_figure(tmp_path: Path):
    """FID comes on the rows where trainer.eval_every measured it: TensorBoard gets it, the figure grows a panel."""
    log = MetricsLog(tmp_path / "metrics.jsonl", 0, 4, 16, show_progress=False, loggers=["jsonl", "tensorboard"])
    for step, fid in [(1, None), (2, 80.5), (3, None), (4, 61.25)]:
        log.add({"loss_d": torch.tensor(1.0 / step), "loss_g": torch.tensor(float(step))})
        log.write(step, 0, {"fid": fid} if fid else None)
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("Metrics/FID")] == [(2, 80.5), (4, 61.25)]
    report.write_report(tmp_path)
    # Three panels (losses, FID, speed) in one line of 4 x 3.2 inch charts; without FID it would be two.
    assert Image.open(RunFolder(tmp_path).loss_figure).size == (1200, 320)
