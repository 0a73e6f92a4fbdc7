"""gan-sample: grids, per-seed images and interpolations from a checkpoint alone."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcgan import cli
from dcgan.sample import load_generator, parse_seeds

from conftest import FAST, run_cli


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    run_cli("gan-train", [*FAST, "trainer.max_steps=10", f"hydra.run.dir={root / 'run'}"], cwd=root)
    return root / "run" / "checkpoints" / "last.pt"


def digest(path: Path) -> str:
    return hashlib.sha256(np.asarray(Image.open(path)).tobytes()).hexdigest()


def test_grid_size_and_seed_determinism(trained_ckpt: Path, tmp_path: Path):
    run_cli("gan-sample", [f"ckpt={trained_ckpt}", "n=12", "nrow=4", "out=a.png", "device=cpu"], cwd=tmp_path)
    run_cli("gan-sample", [f"ckpt={trained_ckpt}", "n=12", "nrow=4", "out=b.png"], cwd=tmp_path)
    run_cli("gan-sample", [f"ckpt={trained_ckpt}", "n=12", "nrow=4", "seed=1", "out=c.png"], cwd=tmp_path)
    grid = Image.open(tmp_path / "a.png")
    # 4 columns x 3 rows of 28 px images with 2 px padding around each.
    assert grid.size == (4 * 30 + 2, 3 * 30 + 2) and grid.mode == "L"
    assert digest(tmp_path / "a.png") == digest(tmp_path / "b.png")
    assert digest(tmp_path / "a.png") != digest(tmp_path / "c.png")


def test_image_depends_only_on_its_seed(trained_ckpt: Path, tmp_path: Path):
    """Image i of a grid with seed s equals the per-seed image of seed s+i, whatever the batch."""
    run_cli("gan-sample", [f"ckpt={trained_ckpt}", "mode=seeds", "seeds=5,6,7", "out=seeds"], cwd=tmp_path)
    run_cli("gan-sample", [f"ckpt={trained_ckpt}", "n=4", "nrow=4", "seed=4", "out=grid.png"], cwd=tmp_path)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    for column, seed in enumerate((5, 6, 7), start=1):
        single = np.asarray(Image.open(tmp_path / "seeds" / f"seed{seed:04d}.png"))
        x = 2 + column * 30
        assert np.array_equal(grid[2:30, x : x + 28], single), seed


def test_interpolation_gif(trained_ckpt: Path, tmp_path: Path):
    run_cli(
        "gan-sample",
        [f"ckpt={trained_ckpt}", "mode=interpolate", "seeds=0,1,2", "frames=5", "out=walk.gif"],
        cwd=tmp_path,
    )
    gif = Image.open(tmp_path / "walk.gif")
    assert gif.n_frames == 15  # 3 legs of 5 frames: 0->1, 1->2, 2->0
    assert gif.size == (28, 28)


def test_scale_enlarges_grids_and_movies_pixel_for_pixel(trained_ckpt: Path, tmp_path: Path):
    """scale=K: every pixel becomes a KxK block (nearest neighbour), padding included; nothing else changes."""
    common = [f"ckpt={trained_ckpt}", "device=cpu"]
    for scale in (1, 3):
        cli.sample_main([*common, "n=6", "nrow=3", f"scale={scale}", f"out={tmp_path / f'grid{scale}.png'}"])
        walk = ["mode=interpolate", "frames=3", f"scale={scale}", f"out={tmp_path / f'walk{scale}.gif'}"]
        cli.sample_main([*common, *walk])
    small, large = np.asarray(Image.open(tmp_path / "grid1.png")), np.asarray(Image.open(tmp_path / "grid3.png"))
    assert large.shape == (3 * small.shape[0], 3 * small.shape[1])
    assert np.array_equal(large, small.repeat(3, axis=0).repeat(3, axis=1))
    small_movie, large_movie = Image.open(tmp_path / "walk1.gif"), Image.open(tmp_path / "walk3.gif")
    assert large_movie.size == (84, 84) and large_movie.n_frames == small_movie.n_frames == 6
    for index in range(6):
        small_movie.seek(index)
        large_movie.seek(index)
        frame = np.asarray(small_movie.convert("L"))
        assert np.array_equal(np.asarray(large_movie.convert("L")), frame.repeat(3, axis=0).repeat(3, axis=1))


def test_uses_ema_weights_and_config_from_checkpoint(trained_ckpt: Path):
    state = torch.load(trained_ckpt, weights_only=True)
    G, cfg, _ = load_generator(trained_ckpt, torch.device("cpu"))
    assert cfg.dataset.name == "mnist_tiny" and cfg.generator.width == 0.25
    name, value = next(iter(G.state_dict().items()))
    assert torch.equal(value, state["generator_ema"][name])
    assert not torch.equal(state["generator_ema"][name], state["generator"][name])
    G_raw, _, _ = load_generator(trained_ckpt, torch.device("cpu"), use_ema=False)
    assert torch.equal(G_raw.state_dict()[name], state["generator"][name])


def test_parse_seeds():
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_seeds("42") == [42]
