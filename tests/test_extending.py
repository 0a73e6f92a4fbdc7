"""A data set, a loss and a generator/discriminator pair added through the public registries (docs/extending.md),
selected by name in the real config, validated, and trained for a few steps in-process."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dcgan import checkpoint, cli, config, data, losses, models
from dcgan.errors import UserError
from dcgan.train import train

from conftest import run_cli

TOY = "toy"
TOY_IMAGES = 48


@pytest.fixture
def toys():
    """Register one toy of each kind; count their calls; unregister them afterwards."""
    calls: Dict[str, int] = {"data": 0, "loss_d": 0, "loss_g": 0, "G": 0, "D": 0}

    @data.dataset(TOY, splits=("a", "b"), origin="random noise")
    def toy_images(cfg: data.DatasetConfig) -> torch.Tensor:
        calls["data"] += 1
        seed = {"a": 0, "b": 1}[cfg.split]
        shape = (TOY_IMAGES, cfg.channels, cfg.image_size, cfg.image_size)
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))

    @losses.loss(TOY)
    class ToyLoss(losses.GANLoss):
        """Least squares with targets 1 (real) and 0 (fake)."""

        def d_terms(self, real_logits, fake_logits):
            calls["loss_d"] += 1
            return ((real_logits - 1) ** 2).mean() + (fake_logits**2).mean()

        def generator(self, D, fake):
            calls["loss_g"] += 1
            return ((D(fake).float() - 1) ** 2).mean()

    class Counted(nn.Sequential):
        def __init__(self, key: str, *layers: nn.Module):
            super().__init__(*layers)
            self.key = key

        def forward(self, x):
            if x.device.type != "meta":  # validate_train's shape check runs on the meta device
                calls[self.key] += 1
            return super().forward(x)

    @models.generator(TOY)
    def toy_generator(image_size: int, channels: int, cfg: models.GeneratorConfig) -> nn.Module:
        image_shape = (channels, image_size, image_size)
        return Counted("G", nn.Linear(cfg.z_dim, channels * image_size**2), nn.Tanh(), nn.Unflatten(1, image_shape))

    @models.discriminator(TOY)
    def toy_discriminator(image_size: int, channels: int, cfg: models.DiscriminatorConfig) -> nn.Module:
        return Counted("D", nn.Flatten(), nn.Linear(channels * image_size * image_size, 1), nn.Flatten(0))  # [N] logits

    yield calls
    for registry in (data.DATASETS, losses.LOSSES, models.GENERATORS, models.DISCRIMINATORS):
        registry.pop(TOY, None)


def toy_config(*overrides: str):
    return config.compose(
        "train",
        [
            f"dataset.name={TOY}",
            "dataset.split=b",
            "dataset.image_size=12",
            "dataset.channels=3",
            f"loss.name={TOY}",
            f"generator.arch={TOY}",
            "generator.z_dim=8",
            f"discriminator.arch={TOY}",
            "trainer.device=cpu",
            "trainer.progress=false",
            "trainer.batch_size=8",
            "trainer.max_steps=4",
            "trainer.log_every=2",
            "trainer.sample_every=4",
            "trainer.ckpt_every=4",
            "trainer.grid_size=8",
            *overrides,
        ],
    )


def test_toy_data_loss_and_architecture_train(toys, tmp_path: Path):
    cfg = toy_config()
    config.validate_train(cfg)
    assert data.describe(cfg.dataset, TOY_IMAGES) == f"toy (b, {TOY_IMAGES} images, 12x12x3) from random noise"
    assert not losses.build_loss(cfg.loss).needs_double_backward

    row = train(cfg, tmp_path / "run")

    assert toys["data"] == 1
    assert toys["loss_d"] == 4 and toys["loss_g"] == 4  # one D and one G step per step (d_steps=1)
    assert toys["G"] > 0 and toys["D"] > 0
    assert row["step"] == 4
    saved = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved["step"] == 4
    # The toy networks' own weights, at the toy data's geometry: z_dim 8 -> 3x12x12 pixels -> one logit.
    assert saved["generator"]["0.weight"].shape == (3 * 12 * 12, 8)
    assert saved["discriminator"]["1.weight"].shape == (1, 3 * 12 * 12)


def test_toy_registrations_drive_validation(toys):
    # The split list comes from the registry: the toy's own splits pass, another data set's fail for it.
    with pytest.raises(UserError, match="dataset.split must be a or b for toy, got 'train'"):
        config.validate_train(toy_config("dataset.split=train"))
    with pytest.raises(UserError, match=r"dataset.name must be one of mnist, .*, mnist_tiny, toy; got 'toi'"):
        config.validate_train(toy_config("dataset.name=toi"))
    with pytest.raises(UserError, match="loss.name must be one of ns, hinge, lsgan, wgan_gp, toy"):
        config.validate_train(toy_config("loss.name=toi"))
    with pytest.raises(UserError, match="is not an architecture; choose one of .*toy"):
        config.validate_train(toy_config("generator.arch=toi"))


def test_double_backward_is_the_losses_own_answer():
    # speed.py leaves D eager for these (torch.compile has no double backward); it no longer knows loss names.
    needs = {name: losses.build_loss(losses.LossConfig(name=name)).needs_double_backward for name in losses.LOSSES}
    assert needs == {"ns": False, "hinge": False, "lsgan": False, "wgan_gp": True}
    assert losses.build_loss(losses.LossConfig(name="hinge", r1_weight=1.0)).needs_double_backward


# ---------------------------------------------------------------- a config folder of the user's own


def write_user_configs(folder: Path) -> Path:
    """A data set, a generator and a preset in a folder outside the package (docs/extending.md)."""
    for group in ("dataset", "generator", "preset"):
        (folder / group).mkdir(parents=True)
    (folder / "dataset" / "digits_100.yaml").write_text("defaults:\n  - mnist_tiny\n  - _self_\nmax_images: 100\n")
    (folder / "generator" / "dcgan_third.yaml").write_text("defaults:\n  - dcgan\n  - _self_\nwidth: 0.33\n")
    (folder / "preset" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /dataset: digits_100\n  - override /generator: dcgan_third\n"
        "  - override /loss: hinge\ntrainer:\n  batch_size: 24\n"
    )
    return folder


def test_config_dir_adds_a_dataset_a_network_and_a_preset(tmp_path: Path):
    """The installed gan-train composes the user's files beside the shipped ones, command line still winning."""
    folder = write_user_configs(tmp_path / "my_configs")
    result = run_cli(
        "gan-train", ["--config-dir", str(folder), "preset=mine", "trainer.seed=7", "--cfg", "job"], cwd=tmp_path
    )
    composed = OmegaConf.create(result.stdout)
    assert (composed.dataset.name, composed.dataset.max_images) == ("mnist_tiny", 100)
    assert (composed.generator.arch, composed.generator.width) == ("dcgan", 0.33)
    assert (composed.loss.name, composed.trainer.batch_size, composed.trainer.seed) == ("hinge", 24, 7)
    assert not (tmp_path / "outputs").exists()  # --cfg job only prints


@pytest.mark.parametrize("spelling", ["--config-dir", "-cd", "--config-dir=", "hydra.searchpath"])
def test_every_spelling_of_the_config_folder_composes_the_same(tmp_path: Path, spelling: str):
    folder = write_user_configs(tmp_path / "my_configs")
    if spelling == "hydra.searchpath":
        args = [f"hydra.searchpath=[file://{folder}]", "preset=mine"]
    elif spelling.endswith("="):
        args = [f"{spelling}{folder}", "preset=mine"]
    else:
        args = [spelling, str(folder), "preset=mine"]
    cfg = config.compose("train", args)
    config.validate_train(cfg)
    assert (cfg.dataset.max_images, cfg.generator.width, cfg.loss.name) == (100, 0.33, "hinge")


def test_a_bad_key_in_a_user_file_is_one_line_pointing_at_help(tmp_path: Path, capsys):
    folder = write_user_configs(tmp_path / "my_configs")
    (folder / "generator" / "typo.yaml").write_text("defaults:\n  - dcgan\n  - _self_\nwidht: 0.5\n")
    with pytest.raises(SystemExit) as exit:
        cli.train_main(["--config-dir", str(folder), "generator=typo", f"hydra.run.dir={tmp_path / 'run'}"])
    error = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and len(error.splitlines()) == 1, error
    assert "widht" in error and "gan-train --help" in error and "--cfg job" in error
    assert "src/dcgan" not in error and not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as exit:
        cli.train_main(["-cd", str(tmp_path / "nowhere"), "dataset=digits_100"])
    assert exit.value.code == 2 and "no such folder" in capsys.readouterr().err
