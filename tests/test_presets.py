"""Every preset composes to the published system and trains a few steps on real (or realistic) data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from torch import nn

from dcgan import models
from dcgan.config import compose, validate_train
from dcgan.train import train

from conftest import make_celeba

PRESETS = ["dcgan64", "tf_dcgan28", "keras_mnist", "keras_fashion", "tf_celeba28", "keras_celeba64"]
SHORT = [
    "trainer.max_steps=2",
    "trainer.batch_size=8",
    "trainer.device=cpu",
    "trainer.progress=false",
    "trainer.log_every=1",
]


def layers(module: nn.Module, kind) -> list:
    return [m for m in module.modules() if isinstance(m, kind)]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_a_few_steps(preset: str, tmp_path: Path):
    cfg = compose("train", [f"preset={preset}"])
    if cfg.dataset.name == "celeba":
        overrides = [f"dataset.root={make_celeba(tmp_path / 'data', count=20)}"]
    else:  # mnist / fashion_mnist presets run on the shipped real MNIST digits here
        overrides = ["dataset=mnist_tiny", "dataset.max_images=64"]
    cfg = compose("train", [f"preset={preset}", *overrides, *SHORT])
    validate_train(cfg)
    row = train(cfg, tmp_path / "run")
    assert row["step"] == 2 and math.isfinite(row["loss_d"]) and math.isfinite(row["loss_g"])
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_dcgan64_is_radford():
    cfg = compose("train", ["preset=dcgan64"])
    assert (cfg.dataset.name, cfg.dataset.image_size, cfg.generator.z_dim, cfg.trainer.batch_size) == (
        "celeba",
        64,
        100,
        128,
    )
    assert cfg.optimizer.generator.lr == 2e-4 and cfg.optimizer.generator.betas[0] == 0.5
    G, D = models.build_generator(cfg), models.build_discriminator(cfg)
    assert [m.out_channels for m in layers(G, nn.ConvTranspose2d)] == [512, 256, 128, 64, 3]
    assert all(m.kernel_size == (4, 4) for m in layers(G, nn.ConvTranspose2d))
    assert [m.out_channels for m in layers(D, nn.Conv2d)] == [64, 128, 256, 512, 1]
    assert len(layers(D, nn.BatchNorm2d)) == 3 and not layers(D, nn.Sigmoid)


def test_tf_dcgan28_layers():
    cfg = compose("train", ["preset=tf_dcgan28"])
    G, D = models.build_generator(cfg), models.build_discriminator(cfg)
    assert layers(G, nn.Linear)[0].out_features == 4 * 4 * 512
    deconvs = layers(G, nn.ConvTranspose2d)
    assert [(m.out_channels, m.kernel_size[0], m.stride[0]) for m in deconvs] == [(256, 4, 1), (128, 4, 2), (1, 5, 2)]
    assert [m.out_channels for m in layers(D, nn.Conv2d)] == [64, 128, 256]
    assert len(layers(D, nn.BatchNorm2d)) == 2


def test_keras_mnist_settings():
    cfg = compose("train", ["preset=keras_mnist"])
    assert cfg.generator.z_dim == 200 and cfg.loss.real_label == 0.9 and cfg.discriminator.dropout == 0.3
    G, D = models.build_generator(cfg), models.build_discriminator(cfg)
    assert layers(G, nn.Linear)[0].out_features == 128 * 7 * 7 and len(layers(G, nn.Upsample)) == 2
    assert [m.kernel_size for m in layers(G, nn.Conv2d)] == [(5, 5), (5, 5)]
    assert [m.p for m in layers(D, nn.Dropout)] == [0.3, 0.3]


def test_keras_fashion_uses_selu_and_bn():
    G = models.build_generator(compose("train", ["preset=keras_fashion"]))
    assert len(layers(G, nn.SELU)) == 1 and len(layers(G, nn.BatchNorm2d)) == 2
    assert [m.kernel_size[0] for m in layers(G, nn.ConvTranspose2d)] == [5, 5]


def test_tf_celeba28_from_1024_channels_with_dropout():
    cfg = compose("train", ["preset=tf_celeba28"])
    G, D = models.build_generator(cfg), models.build_discriminator(cfg)
    assert layers(G, nn.Linear)[0].out_features == 4 * 4 * 1024
    assert [m.out_channels for m in layers(G, nn.ConvTranspose2d)] == [512, 256, 3]
    assert len(layers(G, nn.Dropout)) == 3
    assert len(layers(D, nn.Conv2d)) == 4 and len(layers(D, nn.BatchNorm2d)) == 3


def test_keras_celeba64_mlp_discriminator():
    cfg = compose("train", ["preset=keras_celeba64"])
    G, D = models.build_generator(cfg), models.build_discriminator(cfg)
    assert cfg.generator.z_dim == 4096
    assert [m.out_features for m in layers(D, nn.Linear)] == [512, 256, 1]
    assert layers(D, nn.Linear)[0].in_features == 12288
    assert layers(G, nn.Linear)[0].out_features == 4096


@pytest.mark.parametrize("size", [28, 32, 64, 128])
def test_every_architecture_adapts_to_size(size: int):
    for g in models.GENERATORS:
        for d in models.DISCRIMINATORS:
            validate_train(
                compose(
                    "train",
                    [f"generator={g}", f"discriminator={d}", f"dataset.image_size={size}", "dataset.channels=3"],
                )
            )


def test_command_line_beats_preset():
    cfg = compose("train", ["preset=dcgan64", "dataset=fashion_mnist", "trainer.batch_size=64"])
    assert cfg.dataset.name == "fashion_mnist" and cfg.trainer.batch_size == 64 and cfg.dataset.image_size == 64


RECIPES = sorted(path.stem for path in (Path(__file__).resolve().parents[1] / "configs" / "recipe").glob("*.yaml"))


def test_every_recipe_composes_over_the_28_and_64_px_defaults_and_leaves_data_and_g_alone():
    import yaml

    assert len(RECIPES) >= 10
    for recipe in RECIPES:
        text = (Path(__file__).resolve().parents[1] / "configs" / "recipe" / f"{recipe}.yaml").read_text()
        written = yaml.safe_load(text) or {}
        # A recipe changes training settings only: never the data set or G's architecture, over any preset.
        assert not {"dataset", "generator"} & set(written), recipe
        assert not any("/dataset" in str(d) or "/generator" in str(d) for d in written.get("defaults", [])), recipe
        for preset in (None, "dcgan64"):  # the 28- and 64-px defaults the GPU study compares recipes on
            chosen = [f"preset={preset}"] if preset else []
            validate_train(compose("train", [*chosen, f"recipe={recipe}"]))
    assert compose("train", ["recipe=baseline"]) == compose("train", [])
