"""The quality options, each small and measured in docs/RESULTS.md: the EMA generator's BatchNorm statistics,
spectral norm in D, the R1 penalty, DiffAugment, and all of them together in a real training run that still resumes
exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from dcgan import augment, checkpoint, models
from dcgan.config import UserError, compose, validate_train
from dcgan.losses import build_loss, r1_penalty
from dcgan.optim import EMA, build_optimizer
from dcgan.train import train

CPU = ["trainer.device=cpu", "trainer.progress=false", "dataset=mnist_tiny", "dataset.max_images=256"]


def digits(count: int = 8) -> torch.Tensor:
    """Real MNIST digits in [-1, 1], from the shipped subset."""
    from dcgan import data

    cfg = compose("train", ["dataset=mnist_tiny"])
    return data.load_images(cfg.dataset)[:count].float() / 127.5 - 1


# ---------------------------------------------------------------- EMA: BatchNorm statistics of the averaged weights


def test_ema_measures_batchnorm_statistics_for_its_own_weights():
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4), nn.BatchNorm1d(4))
    ema = EMA(G, 0.5, lambda generator: torch.randn(256, 8, generator=generator), torch.device("cpu"), batches=4)
    with torch.no_grad():
        G(torch.randn(256, 8) * 3 + 1)  # the live statistics: of other weights and other inputs
        for p in G.parameters():
            p.add_(torch.randn_like(p))
    ema.update(G, step=10_000)
    model = ema.calibrated()

    generator = torch.Generator().manual_seed(0)
    z = torch.cat([torch.randn(256, 8, generator=generator) for _ in range(4)])
    with torch.no_grad():
        first = model[0](z)
    bn = model[1]
    assert not model.training and bn.momentum == 0.1  # left as the training code expects it
    torch.testing.assert_close(bn.running_mean, first.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var, first.var(0), rtol=0.05, atol=1e-4)
    assert not torch.allclose(bn.running_mean, G[1].running_mean, atol=1e-2)  # not the live G's copy

    bn.running_mean.add_(1.0)
    assert ema.calibrated() is model and torch.allclose(
        bn.running_mean, first.mean(0) + 1
    )  # cached until the next update
    ema.update(G, step=10_001)
    ema.calibrated()
    torch.testing.assert_close(bn.running_mean, model[0](z).mean(0).detach(), atol=1e-5, rtol=1e-5)  # measured again


def test_ema_without_batchnorm_is_never_recalibrated():
    G = nn.Sequential(nn.Linear(8, 4))
    ema = EMA(G, 0.5, lambda generator: pytest.fail("no latents needed without BatchNorm"), torch.device("cpu"))
    ema.update(G, step=1)
    assert ema.calibrated() is ema.model


# ---------------------------------------------------------------- spectral normalization


@pytest.mark.parametrize("preset", ["dcgan64", "keras_mnist", "tf_dcgan28", "keras_celeba64"])
def test_spectral_norm_wraps_every_weight_layer_of_d(preset: str):
    cfg = compose("train", [f"preset={preset}", "discriminator.spectral_norm=true", "discriminator.norm=none"])
    validate_train(cfg)  # the meta-device shape check runs with the parametrization in place
    D = models.build_discriminator(cfg)
    layers = [m for m in D.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers and all(hasattr(m, "parametrizations") and hasattr(m.parametrizations, "weight") for m in layers)
    assert len([k for k in D.state_dict() if k.endswith("parametrizations.weight.original")]) == len(layers)
    # In training mode every forward pass refines the power iteration; the effective weights end at sigma = 1.
    images = torch.randn(4, cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)
    D.train()
    with torch.no_grad():
        for _ in range(5):
            D(images)
    D.eval()
    for layer in layers:
        sigma = torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2)
        assert sigma == pytest.approx(1.0, abs=0.05), (type(layer).__name__, float(sigma))


def test_without_spectral_norm_d_is_unchanged():
    cfg = compose("train", ["preset=keras_mnist"])
    D = models.build_discriminator(cfg)
    assert not any(hasattr(m, "parametrizations") for m in D.modules())


# ---------------------------------------------------------------- R1


def test_r1_of_a_linear_critic_is_its_squared_weight_norm():
    """For D(x) = <w, x> + b the gradient at every image is w, so E|grad|^2 = |w|^2 exactly."""
    D = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 1))
    real = digits().requires_grad_(True)
    penalty = r1_penalty(D(real).reshape(-1), real)
    assert float(penalty.detach()) == pytest.approx(float(D[1].weight.detach().square().sum()), rel=1e-5)


@pytest.mark.parametrize("loss_name", ["ns", "hinge", "lsgan", "wgan_gp"])
def test_r1_adds_gamma_over_two_times_the_penalty_and_trains_d(loss_name: str):
    cfg = compose("train", [f"loss={loss_name}", "discriminator.norm=none", "discriminator.width=0.25"])
    torch.manual_seed(0)
    D = models.build_discriminator(cfg)
    real, fake = digits(), torch.rand(8, 1, 28, 28) * 2 - 1
    cfg.loss.r1_weight = 0.0
    torch.manual_seed(1)
    plain, _ = build_loss(cfg.loss).discriminator(D, real, fake)
    cfg.loss.r1_weight = 1000.0  # large, so the term stands well clear of float32 rounding in the rest
    torch.manual_seed(1)  # the same interpolation for wgan_gp's own penalty
    regularized, stats = build_loss(cfg.loss).discriminator(D, real, fake)
    assert math.isfinite(float(regularized.detach())) and float(stats["r1_penalty"]) > 0
    assert float((regularized - plain).detach()) == pytest.approx(500.0 * float(stats["r1_penalty"]), rel=1e-3)
    regularized.backward()  # the penalty's own gradient (double backward) reaches D's weights
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in D.parameters())


# ---------------------------------------------------------------- DiffAugment


def test_translation_shifts_each_image_by_at_most_an_eighth_with_zero_fill():
    x = digits(16)
    torch.manual_seed(0)
    out = augment.random_translation(x)
    assert out.shape == x.shape
    limit = int(28 * augment.TRANSLATION_RATIO + 0.5)  # 4 pixels
    padded = torch.nn.functional.pad(x, [limit] * 4)
    for image, moved in zip(padded, out, strict=False):
        candidates = [
            (dy, dx)
            for dy in range(-limit, limit + 1)
            for dx in range(-limit, limit + 1)
            if torch.equal(image[:, limit + dy : limit + dy + 28, limit + dx : limit + dx + 28], moved)
        ]
        assert candidates, "not a shift of the input within the limit"


def test_cutout_zeroes_one_square_and_keeps_the_rest():
    x = digits(16) * 0.5 + 0.6  # no zero pixels, so the cut is visible
    torch.manual_seed(0)
    out = augment.random_cutout(x)
    side = int(28 * augment.CUTOUT_RATIO + 0.5)
    for image, cut in zip(x, out, strict=False):
        erased = cut[0] == 0
        rows, cols = erased.any(1).nonzero().flatten(), erased.any(0).nonzero().flatten()
        assert 0 < erased.sum() <= side * side
        # The erased pixels form one axis-aligned rectangle (a square clipped at the border).
        assert erased[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        assert torch.equal(cut[:, ~erased], image[:, ~erased])


def test_color_ops_change_what_the_paper_says_and_nothing_else():
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    torch.manual_seed(0)
    brighter = augment.random_brightness(x)
    shift = (brighter - x).flatten(1)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-6) and shift.abs().max() <= 0.5
    saturated = augment.random_saturation(x)  # keeps each pixel's mean over channels
    assert torch.allclose(saturated.mean(1), x.mean(1), atol=1e-5)
    contrasted = augment.random_contrast(x)  # keeps each image's mean
    assert torch.allclose(contrasted.mean([1, 2, 3]), x.mean([1, 2, 3]), atol=1e-5)
    gray = x[:, :1]
    assert torch.equal(augment.random_saturation(gray), gray)  # no colour to saturate


def test_full_policy_keeps_shape_is_differentiable_and_bounded():
    x = digits(8).requires_grad_(True)
    policy = augment.parse_policy(["color", "translation", "cutout"])
    out = augment.diff_augment(x, policy)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    # From [-1, 1]: brightness +-0.5, contrast x1.5 about the mean: never beyond +-3.
    assert out.abs().max() <= 3.0
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_wrap_augments_what_d_sees_and_is_d_itself_without_a_policy():
    D = nn.Identity()
    assert augment.wrap(D, []) is D
    seen = augment.wrap(D, ["cutout"])
    x = digits(4) * 0.5 + 0.6
    assert (seen(x) == 0).any() and not (x == 0).any()
    with pytest.raises(UserError, match="unknown op colour"):
        augment.parse_policy(["colour"])


# ---------------------------------------------------------------- all together, through train()


def test_all_quality_options_train_and_resume_exactly(tmp_path: Path):
    options = [
        *CPU,
        "generator.width=0.25",
        "discriminator.width=0.25",
        "discriminator.norm=none",
        "discriminator.spectral_norm=true",
        "loss.r1_weight=1.0",
        "loss.r1_every=2",
        "trainer.ema_start=2",
        "augment.policy=[color,translation,cutout]",
        "optimizer.discriminator.lr=4e-4",
        "optimizer.generator.lr=1e-4",
        "trainer.batch_size=16",
        "trainer.log_every=2",
        "trainer.ckpt_every=3",
        "trainer.sample_every=100",
    ]
    straight = train(compose("train", [*options, "trainer.max_steps=6"]), tmp_path / "straight")
    assert math.isfinite(straight["loss_d"]) and straight["r1_penalty"] > 0
    train(compose("train", [*options, "trainer.max_steps=3"]), tmp_path / "split")
    train(compose("train", [*options, "trainer.max_steps=6", "trainer.resume=auto"]), tmp_path / "split")
    a = checkpoint.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = checkpoint.load(tmp_path / "split" / "checkpoints" / "last.pt")
    for part in ("generator", "discriminator", "generator_ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)


# ---------------------------------------------------------------- schedules: EMA start, lazy R1, lr decay, time limit


def test_ema_copies_g_until_its_start_then_ramps_the_same_on_host_and_device_counters():
    G = nn.Linear(3, 2)
    ema = EMA(G, 0.999, lambda generator: torch.randn(4, 3, generator=generator), torch.device("cpu"), start=5)
    counter = torch.tensor(3.0)
    twin = EMA(G, 0.999, lambda generator: torch.randn(4, 3, generator=generator), torch.device("cpu"), start=5)
    for step in range(3, 8):
        before = ema.model.weight.clone()
        with torch.no_grad():
            G.weight.add_(1.0)
        ema.update(G, step)
        twin.update(G, counter)
        since = step - 5
        decay = 0.0 if since < 0 else (1 + since) / (10 + since)  # the ramp restarts at trainer.ema_start
        torch.testing.assert_close(ema.model.weight, decay * before + (1 - decay) * G.weight)
        torch.testing.assert_close(twin.model.weight, ema.model.weight)
    assert counter.item() == 8


def test_lazy_r1_regularizes_every_kth_update_k_times_as_strongly():
    torch.manual_seed(0)
    D = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 1))
    real, fake = digits(), torch.rand(8, 1, 28, 28) * 2 - 1
    every = compose("train", ["loss.r1_weight=2.0", "loss.r1_every=4"]).loss
    plain, _ = build_loss(compose("train", []).loss).discriminator(D, real, fake)
    lazy, stats = build_loss(every).discriminator(D, real, fake, update=8)
    assert stats["r1_penalty"] > 0
    torch.testing.assert_close(lazy, plain + 2.0 * 4 / 2 * stats["r1_penalty"])
    skipped, stats = build_loss(every).discriminator(D, real, fake, update=9)
    assert "r1_penalty" not in stats and torch.equal(skipped, plain)


def test_lr_decay_falls_linearly_over_the_last_part_and_a_resume_decays_from_the_base_rate():
    from dcgan.schedule import Schedule
    from dcgan.state import load_optimizer

    settings = compose("train", []).optimizer.generator

    def make() -> torch.optim.Optimizer:
        return build_optimizer([nn.Parameter(torch.zeros(2))], settings, "optimizer.generator")

    optimizer = make()
    schedule = Schedule(10, 0, 0, 0.4, [optimizer], torch.device("cpu"))
    rates = []
    for step in range(10):
        schedule.set_learning_rates(step)
        rates.append(optimizer.param_groups[0]["lr"] / 2e-4)
    assert rates == pytest.approx([1, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25])
    # The checkpoint holds the decayed rate and the base one; a resumed run goes on from where it was.
    fresh = make()
    load_optimizer(fresh, optimizer.state_dict())
    assert fresh.param_groups[0]["lr"] == pytest.approx(0.25 * 2e-4)
    Schedule(10, 0, 0, 0.4, [fresh], torch.device("cpu")).set_learning_rates(8)
    assert fresh.param_groups[0]["lr"] == pytest.approx(0.5 * 2e-4)


def test_the_time_limit_ends_a_run_checkpointed_and_resume_goes_on(tmp_path: Path):
    import json

    options = [*CPU, "generator.width=0.25", "discriminator.width=0.25", "trainer.batch_size=16", "trainer.log_every=2"]
    timed = [*options, "trainer.max_steps=50", "trainer.max_minutes=1e-6", "trainer.ckpt_every=1000"]
    row = train(compose("train", timed), tmp_path)
    assert row["step"] == 2 and row["minutes"] > 0  # the first reading of the clock is past the limit
    card = json.loads((tmp_path / "run_card.json").read_text())
    assert card["status"] == "time limit" and card["final_step"] == 2
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["step"] == 2
    # Timed checkpoints: one at each reading of the clock once the interval has passed.
    resumed = [*options, "trainer.max_steps=6", "trainer.resume=auto", "trainer.ckpt_every_minutes=1e-6"]
    assert train(compose("train", resumed), tmp_path)["step"] == 6
    steps = [checkpoint.step_of(p) for p in checkpoint.step_checkpoints(tmp_path / "checkpoints")]
    assert steps == [2, 4, 6]


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.lr_decay=1.5", "trainer.lr_decay is a fraction"),
        ("trainer.max_minutes=-1", "trainer.max_minutes must be >= 0"),
        ("trainer.ckpt_every_minutes=-2", "trainer.ckpt_every_minutes must be >= 0"),
        ("trainer.eval_every_minutes=-1", "trainer.eval_every_minutes must be >= 0"),
        ("trainer.max_images=-5", "trainer.max_images"),
        ("trainer.ema_start=-1", "trainer.ema_start"),
        ("loss.r1_every=0", "loss.r1_every"),
    ],
)
def test_schedule_settings_are_checked(override: str, message: str):
    with pytest.raises(UserError, match=message):
        validate_train(compose("train", [override]))
