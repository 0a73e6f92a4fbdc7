"""gan-train end to end through the installed console script, on the shipped real MNIST subset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dcgan import checkpoint, data, models
from dcgan.config import compose, train_config_from_yaml
from dcgan.images import generate, latents

from conftest import FAST, assert_same_training, run_cli


def pixel_statistics_distance(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Distance between per-pixel mean and std of two image sets in [-1, 1] (a cheap, honest proxy)."""
    return float((images.mean(0) - reference.mean(0)).norm() + (images.std(0) - reference.std(0)).norm())


def test_smoke_training_learns_mnist(tmp_path: Path):
    run_dir = tmp_path / "run"
    steps = 300
    full_width = [arg for arg in FAST if ".width=" not in arg]  # the real default networks
    run_cli(
        "gan-train",
        [
            *full_width,
            f"trainer.max_steps={steps}",
            "trainer.batch_size=64",
            "trainer.log_every=25",
            "trainer.sample_every=100",
            "trainer.ckpt_every=100",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    # Outputs: checkpoints, grids, metrics, Hydra's record of the config.
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert [p.name for p in checkpoint.step_checkpoints(run_dir / "checkpoints")] == [
        "step_000100.pt",
        "step_000200.pt",
        "step_000300.pt",
    ]
    grids = sorted(p.name for p in (run_dir / "samples").glob("*.png"))
    assert grids == ["step_000000.png", "step_000100.png", "step_000200.png", "step_000300.png"]
    assert Image.open(run_dir / "samples" / "step_000300.png").size == (8 * 30 + 2, 8 * 30 + 2)
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(25, steps + 1, 25))
    for key in ("loss_d", "loss_g", "d_real", "d_fake", "d_accuracy", "images_per_s"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert 0 <= rows[-1]["d_real"] <= 1 and 0 <= rows[-1]["d_accuracy"] <= 1

    # The samples moved toward the data: compare pixel statistics with the real digits,
    # for the trained EMA generator and for a freshly initialized one.
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    cfg = train_config_from_yaml(state["config_yaml"])
    real = data.load_images(cfg.dataset)[:1000].float() / 127.5 - 1
    z = latents(list(range(1000)), cfg.generator.z_dim, cfg.generator.z_distribution)
    trained = models.build_generator(cfg)
    trained.load_state_dict(state["generator_ema"])
    torch.manual_seed(123)
    untrained = models.build_generator(cfg)
    before = pixel_statistics_distance(generate(untrained, z), real)
    after = pixel_statistics_distance(generate(trained, z), real)
    assert after < 0.35 * before, (before, after)


def test_resume_is_exact(tmp_path: Path):
    """N steps, then resume for M more, gives bit-identical weights to N+M steps straight."""
    common = [*FAST, "trainer.ckpt_every=7", "trainer.ema=0.9", "loss.real_label=0.9", "discriminator.dropout=0.2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_cli("gan-train", [*common, "trainer.max_steps=14", f"hydra.run.dir={straight}"], cwd=tmp_path)
    run_cli("gan-train", [*common, "trainer.max_steps=7", f"hydra.run.dir={split}"], cwd=tmp_path)
    run_cli(
        "gan-train", [*common, "trainer.max_steps=14", "trainer.resume=auto", f"hydra.run.dir={split}"], cwd=tmp_path
    )
    a = checkpoint.load(straight / "checkpoints" / "last.pt")
    b = checkpoint.load(split / "checkpoints" / "last.pt")
    assert a["step"] == 14
    assert_same_training(a, b)
    # The log reads as one run: no duplicated or missing steps.
    steps = [json.loads(line)["step"] for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 7, 10, 14]


def test_resume_from_explicit_path_and_mismatch(tmp_path: Path):
    first = tmp_path / "first"
    run_cli("gan-train", [*FAST, "trainer.max_steps=5", f"hydra.run.dir={first}"], cwd=tmp_path)
    ckpt = first / "checkpoints" / "last.pt"
    other = tmp_path / "other"
    run_cli(
        "gan-train", [*FAST, "trainer.max_steps=8", f"trainer.resume={ckpt}", f"hydra.run.dir={other}"], cwd=tmp_path
    )
    assert checkpoint.load(other / "checkpoints" / "last.pt")["step"] == 8
    # A checkpoint of another architecture is refused with a message, not a state-dict traceback.
    result = run_cli(
        "gan-train",
        [
            *FAST,
            "trainer.max_steps=8",
            "generator.width=0.5",
            f"trainer.resume={ckpt}",
            f"hydra.run.dir={tmp_path / 'third'}",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    assert "generator" in result.stderr and "Traceback" not in result.stderr


def test_checkpoint_is_self_contained_and_safe(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_cli("gan-train", [*FAST, "trainer.max_steps=10", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    path = run_dir / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)  # no pickled code inside
    assert isinstance(state["config_yaml"], str) and "generator:" in state["config_yaml"]
    assert set(state) >= {
        "generator",
        "discriminator",
        "generator_ema",
        "optimizer_g",
        "optimizer_d",
        "step",
        "epoch",
        "rng",
        "data",
        "config_yaml",
    }
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


def test_keep_last_retention(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_cli(
        "gan-train",
        [*FAST, "trainer.max_steps=20", "trainer.ckpt_every=4", "trainer.keep_last=2", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
    )
    names = [p.name for p in checkpoint.step_checkpoints(run_dir / "checkpoints")]
    assert names == ["step_000016.pt", "step_000020.pt"]
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["step"] == 20


def test_epochs_bound_and_d_steps(tmp_path: Path):
    run_dir = tmp_path / "run"
    # 200 images, batch 16 -> 12 batches per epoch; 2 epochs with 2 D steps per G step -> 12 G steps.
    run_cli(
        "gan-train",
        [*FAST, "dataset.max_images=200", "trainer.epochs=2", "trainer.d_steps=2", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
    )
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 12
    assert state["data"] == {"epoch": 2, "position": 0, "batch_size": 16}


def test_every_loss_trains(tmp_path: Path):
    for loss in ("ns", "hinge", "lsgan", "wgan_gp"):
        extra = ["discriminator.norm=none"] if loss == "wgan_gp" else []
        run_dir = tmp_path / loss
        run_cli(
            "gan-train",
            [*FAST, f"loss={loss}", *extra, "trainer.max_steps=6", f"hydra.run.dir={run_dir}"],
            cwd=tmp_path,
        )
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) for r in rows), loss
        if loss == "wgan_gp":
            assert "gradient_penalty" in rows[-1]


def test_other_optimizers_and_amp(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_cli(
        "gan-train",
        [
            *FAST,
            "optimizer=rmsprop",
            "optimizer.discriminator.name=SGD",
            "+optimizer.discriminator.extra.momentum=0.9",
            "trainer.amp=true",
            "trainer.max_steps=4",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert "momentum_buffer" in next(iter(state["optimizer_d"]["state"].values()))


def test_compose_matches_cli_defaults():
    cfg = compose("train", [])
    assert cfg.dataset.name == "mnist_tiny"
    assert cfg.optimizer.generator.lr == 2e-4 and list(cfg.optimizer.generator.betas) == [0.5, 0.999]
    assert cfg.trainer.ema > 0
    assert np.isclose(cfg.loss.real_label, 1.0)
