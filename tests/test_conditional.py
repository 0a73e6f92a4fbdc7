"""Class-conditional training and sampling (conditional=true), through the installed commands on real data.

One conditional checkpoint is trained on the bundled MNIST digits (module fixture); the sampling, export and
error tests share it. A folder of class sub-folders is trained on separately.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from PIL import Image

from dcgan import checkpoint, cli, data, models, train
from dcgan.config import compose
from dcgan.layout import RunFolder
from dcgan.sample import load_generator

from conftest import FAST, assert_refused, run_cli

CONDITIONAL = ["conditional=true", *FAST, "trainer.max_steps=6"]  # all 5,000 digits: mnist_tiny is stored by digit


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conditional")
    run_cli("gan-train", [*CONDITIONAL, f"hydra.run.dir={root / 'run'}"], cwd=root)
    return root / "run"


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def sample_args(run: Path, cwd: Path, args: List[str]) -> List[str]:
    """gan-sample's arguments for the run's checkpoint, out= under `cwd`."""
    args = [f"out={cwd / a[4:]}" if a.startswith("out=") else a for a in args]
    return [f"ckpt={run / 'checkpoints' / 'last.pt'}", "device=cpu", *args]


def sample(run: Path, cwd: Path, args: List[str]) -> None:
    """gan-sample in this process (the command's own entry point): seconds cheaper than a new process each."""
    cli.sample_main(sample_args(run, cwd, args))


def test_a_conditional_run_records_its_classes_and_draws_a_row_per_class(run: Path):
    card = json.loads((run / "run_card.json").read_text())
    names = [str(digit) for digit in range(10)]
    assert card["classes"] == {"names": names, "images": {name: 500 for name in names}}
    assert "classes: 10 classes: 0 (500), 1 (500)," in (run / "train.log").read_text()
    assert checkpoint.load(run / "checkpoints" / "last.pt")["classes"] == names
    grid = Image.open(run / "samples" / "step_000006.png")
    assert grid.size == (2 + 8 * 30, 2 + 10 * 30)  # 8 columns, a row per class (28 px images, 2 px padding)


def test_class_sampling_is_by_name_or_index_and_the_same_seed_gives_the_same_image(run: Path, tmp_path: Path):
    sample(run, tmp_path, ["class=7", "n=8", "out=seven.png"])
    sample(run, tmp_path, ["class=7", "n=8", "out=again.png"])
    sample(run, tmp_path, ["class=3", "n=8", "out=three.png"])
    assert np.array_equal(pixels(tmp_path / "seven.png"), pixels(tmp_path / "again.png"))
    assert not np.array_equal(pixels(tmp_path / "seven.png"), pixels(tmp_path / "three.png"))

    sample(run, tmp_path, ["mode=classes", "nrow=4", "out=classes.png"])
    rows = pixels(tmp_path / "classes.png")
    assert rows.shape[:2] == (2 + 10 * 30, 2 + 4 * 30)
    assert json.loads((tmp_path / "classes.json").read_text())["rows"] == [str(d) for d in range(10)]
    # Row 7 of the classes grid is class 7 from seeds 0-3: the first four images of the class=7 grid.
    seven_first_four = pixels(tmp_path / "seven.png")[2:30, : 2 + 4 * 30]
    assert np.array_equal(rows[2 + 7 * 30 : 30 + 7 * 30], seven_first_four)

    sample(run, tmp_path, ["mode=interpolate", "class=[3,8]", "frames=4", "out=walk.png"])
    walk = pixels(tmp_path / "walk.png")
    assert walk.shape[:2] == (32, 2 + 5 * 30)  # one leg, 3 -> 8, both ends shown
    assert np.array_equal(walk[2:30, 2:30], rows[2 + 3 * 30 : 30 + 3 * 30, 2:30])  # it starts at seed 0's 3


def test_without_a_class_each_seed_draws_its_own_class_whatever_is_drawn_beside_it(run: Path, tmp_path: Path):
    sample(run, tmp_path, ["mode=seeds", "seeds=0-9", "out=all/"])
    sample(run, tmp_path, ["mode=seeds", "seeds=5,17", "out=two/"])
    sample(run, tmp_path, ["mode=seeds", "seeds=5", "class=5", "out=five/"])
    assert np.array_equal(pixels(tmp_path / "all" / "seed0005.png"), pixels(tmp_path / "two" / "seed0005.png"))
    assert np.array_equal(pixels(tmp_path / "two" / "seed0005.png"), pixels(tmp_path / "five" / "seed0005.png"))


def test_exports_take_the_label_as_an_input(run: Path, tmp_path: Path):
    G, cfg, _ = load_generator(run / "checkpoints" / "last.pt", torch.device("cpu"))
    z, labels = torch.randn(3, cfg.generator.z_dim), torch.tensor([7, 0, 9])
    with torch.no_grad():
        want = G(z, labels)

    sample(run, tmp_path, ["mode=export", "out=g.pt"])
    scripted = torch.jit.load(str(tmp_path / "g.pt"))
    assert torch.allclose(scripted(z, labels), want, atol=1e-5)

    sample(run, tmp_path, ["mode=export", "format=safetensors", "out=g.safetensors"])
    about = json.loads((tmp_path / "g.json").read_text())
    assert about["classes"] == [str(d) for d in range(10)] and about["format_version"] == 2  # version 1 readers refuse
    cli.sample_main([f"ckpt={tmp_path / 'g.safetensors'}", "class=7", "n=8", f"out={tmp_path / 'from_export.png'}"])
    sample(run, tmp_path, ["class=7", "n=8", "out=from_checkpoint.png"])
    assert np.array_equal(pixels(tmp_path / "from_export.png"), pixels(tmp_path / "from_checkpoint.png"))

    onnxruntime = pytest.importorskip("onnxruntime")
    sample(run, tmp_path, ["mode=export", "format=onnx", "out=g.onnx"])
    session = onnxruntime.InferenceSession(str(tmp_path / "g.onnx"))
    properties = session.get_modelmeta().custom_metadata_map
    assert json.loads(properties["classes"]) == [str(d) for d in range(10)] and properties["z_dim"] == "100"
    (images,) = session.run(["images"], {"z": z.numpy(), "labels": labels.numpy()})
    assert np.allclose(images, want.numpy(), atol=1e-4)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["class=seven"], "no class 'seven'"),
        (["class=10"], "no class 10: the 10 classes are numbered 0..9"),
        (["class=-1"], "no class -1: the 10 classes are numbered 0..9"),
        (["mode=export", "class=3"], "class=3 would have no effect"),
        (["class=[3,8]"], "mode=grid draws one"),
        (["mode=interpolate", "class=[3,8]", "frames=0"], "interpolate needs frames >= 1 and fps >= 1, got frames=0"),
        (["mode=interpolate", "class=[3,8,8]"], "class=[3,8,8]: 8 then 8 is the same class twice in a row"),
    ],
)
def test_bad_class_requests_are_one_line(run: Path, tmp_path: Path, args: List[str], expected: str, capsys):
    assert_refused(cli.sample_main, "gan-sample", sample_args(run, tmp_path, args), expected, capsys)


def test_resume_continues_a_conditional_run_and_refuses_to_drop_its_classes(run: Path, tmp_path: Path, capsys):
    again = run_cli(
        "gan-train",
        [*CONDITIONAL, "trainer.max_steps=8", "trainer.resume=auto", f"hydra.run.dir={run}"],
        tmp_path,
    )
    assert "resumed from" in again.stderr + again.stdout
    assert checkpoint.load(run / "checkpoints" / "last.pt")["step"] == 8
    unconditional = [arg for arg in CONDITIONAL if arg != "conditional=true"]
    args = [*unconditional, "trainer.max_steps=10", "trainer.resume=auto", f"hydra.run.dir={run}"]
    expected = "the checkpoint was trained with conditional=true, not false; resume with conditional=true"
    assert_refused(cli.train_main, "gan-train", args, expected, capsys)
    elsewhere = tmp_path / "elsewhere"  # refused before Hydra makes the new run folder or writes its record there
    args[-2:] = [f"trainer.resume={run / 'checkpoints' / 'last.pt'}", f"hydra.run.dir={elsewhere}"]
    assert_refused(cli.train_main, "gan-train", args, expected, capsys)
    assert not elsewhere.exists()
    for name in ("cats", "dogs"):  # other classes: refused as early
        (tmp_path / "pets" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((28, 28), np.uint8), "L").save(tmp_path / "pets" / name / "0.png")
    folder = ["dataset=folder", f"dataset.root={tmp_path / 'pets'}", "dataset.image_size=28", "dataset.channels=1"]
    args = [*CONDITIONAL, *folder, *args[-2:]]
    expected = "the checkpoint's 10 classes (0, 1, 2, 3, 4, 5, ...) are not this data's 2 (cats, dogs)"
    assert_refused(cli.train_main, "gan-train", args, expected, capsys)
    assert not elsewhere.exists()


def test_class_of_an_unconditional_checkpoint_and_conditional_on_unlabelled_images_are_refused(tmp_path: Path, capsys):
    plain = Path(__file__).parent / "fixtures" / "checkpoint_format1.pt"  # an unconditional run's checkpoint
    args = [f"ckpt={plain}", "device=cpu", "class=3", f"out={tmp_path / 'g.png'}"]
    assert_refused(cli.sample_main, "gan-sample", args, "was trained without classes (conditional=false)", capsys)

    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(4):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8), "L").save(loose / f"{i}.png")
    args = [*CONDITIONAL, "dataset=folder", f"dataset.root={loose}", f"hydra.run.dir={tmp_path / 'r'}"]
    assert_refused(
        cli.train_main, "gan-train", args, "conditional=true needs one sub-folder of images per class", capsys
    )
    assert not (tmp_path / "r").exists()


def test_conditional_training_on_a_folder_of_class_sub_folders(tmp_path: Path):
    """The ImageFolder layout: each first-level sub-folder a class, named after it."""
    rng = np.random.default_rng(0)
    for name, level in (("cats", 60), ("dogs", 190)):
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(16):
            noisy = np.clip(level + rng.normal(0, 20, (32, 32)), 0, 255).astype(np.uint8)
            Image.fromarray(noisy, "L").save(tmp_path / "pets" / name / f"{i}.png")
    args = [*CONDITIONAL, "dataset=folder", f"dataset.root={tmp_path / 'pets'}", "dataset.image_size=32"]
    cli.train_main([*args, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"])  # in this process: quicker
    card = json.loads((tmp_path / "run" / "run_card.json").read_text())
    assert card["classes"] == {"names": ["cats", "dogs"], "images": {"cats": 16, "dogs": 16}}
    sample(tmp_path / "run", tmp_path, ["class=dogs", "n=4", "out=dogs.png"])
    assert pixels(tmp_path / "dogs.png").shape[:2] == (2 + 32 + 2, 2 + 4 * 34)


def test_classes_without_training_images_are_warned_about(tmp_path: Path, caplog):
    """mnist_tiny is stored digit by digit: its first 64 images are all zeros, and G would never learn 1 to 9."""
    cfg = compose("train", [*CONDITIONAL, "dataset.max_images=64"])
    labels = data.load_labels(cfg.dataset)
    with caplog.at_level(logging.WARNING, logger="dcgan.train"):
        train.report_classes(labels, cfg.dataset, RunFolder(tmp_path))
    (warning,) = caplog.messages
    assert warning.startswith(
        "9 of the 10 classes have no training images in the first 64 images (dataset.max_images): 1, 2, 3, 4, 5, 6, "
        "7, 8, 9. The grids and gan-sample still draw them, but G never learns them"
    )


def test_the_ema_generators_batchnorm_is_measured_on_every_class_in_turn():
    """The averaged G's conditional BatchNorm statistics come from latents drawn for classes 0, 1, ..., C-1, 0, ...:
    the same as running the calibration's latents through it with those labels given explicitly."""
    overrides = ["conditional=true", "generator.condition=batchnorm", "trainer.batch_size=16", "dataset.max_images=64"]
    cfg = compose("train", [*overrides, "generator.width=0.25", "discriminator.width=0.25", "trainer.device=cpu"])
    state, step, _ = train.build(cfg, torch.device("cpu"))
    step()
    calibrated = state.G_ema.calibrated()
    norms = [m.norm for m in calibrated.modules() if isinstance(m, models.ConditionalBatchNorm)]
    measured = [norm.running_mean.clone() for norm in norms]

    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    generator = torch.Generator().manual_seed(0)  # the calibration's own latents (optim.EMA.calibrated)
    calibrated.train()
    with torch.no_grad():
        for _ in range(state.G_ema.batches):
            z = state.G_ema.latents(generator)
            calibrated(z, torch.arange(len(z)) % 10)
    calibrated.eval()
    assert all(torch.allclose(a, norm.running_mean) for a, norm in zip(measured, norms, strict=True))
