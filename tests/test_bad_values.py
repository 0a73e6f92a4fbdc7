"""Every accepted value has its effect or is refused: NaN and inf, values a mode or a loss never reads, and
counts a typo makes huge, each refused with one line and exit code 2 before any work or any file.

A table per command, in the style of test_bad_inputs.py. The cases run in-process through each
command's main(), where a refusal costs a fraction of a second; that main() is what the installed
console script runs, and test_bad_inputs.py and test_bad_files.py run the scripts themselves to prove
that no traceback reaches a user.
gan-sample and gan-eval read the committed fixture checkpoint, so no test here trains.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcgan import cli

from conftest import FAST, REPO, WEIGHTS, assert_refused

CHECKPOINT = REPO / "tests" / "fixtures" / "checkpoint_format1.pt"  # 4 steps, 28 px, z_dim 16


# ---------------------------------------------------------------- gan-train: the composed config's values

TRAIN_CASES = {
    # NaN and inf
    "NaN learning rate": ("optimizer.generator.lr=nan", "optimizer.generator.lr must be a finite number, got nan"),
    "infinite learning rate": ("optimizer.discriminator.lr=inf", "optimizer.discriminator.lr must be a finite"),
    "NaN R1 weight": ("loss.r1_weight=nan", "loss.r1_weight must be a finite number"),
    "infinite generator width": ("generator.width=inf", "generator.width must be a finite number"),
    "infinite time slot": ("trainer.max_minutes=inf", "trainer.max_minutes must be a finite number"),
    "NaN health threshold": ("trainer.health.collapse_loss_g=nan", "trainer.health.collapse_loss_g must be a finite"),
    # values that would do nothing
    "betas for RMSprop": (
        "optimizer=rmsprop optimizer.generator.betas=[0.9,0.99]",
        "torch.optim.RMSprop has no betas",
    ),
    "betas for SGD": (
        "optimizer.discriminator.name=SGD optimizer.discriminator.betas=[0.0,0.9]",
        "torch.optim.SGD has no betas",
    ),
    "label smoothing for the hinge loss": ("loss=hinge loss.real_label=0.9", "loss=hinge does not use it"),
    "gradient penalty without WGAN-GP": ("loss.gp_weight=5", "use it with loss=wgan_gp"),
    "lazy R1 without R1": ("loss.r1_every=4", "R1 is off (loss.r1_weight=0)"),
    "dropout for an architecture without dropout": (
        "generator=keras_fashion generator.dropout=0.3",
        "generator.arch=keras_fashion has no dropout layer",
    ),
    "EMA start without an EMA": ("trainer.ema=0 trainer.ema_start=10", "the EMA is off (trainer.ema=0)"),
    "rollback settings when a divergence stops": (
        "trainer.health.max_rollbacks=5",
        "trainer.on_divergence=stop never rolls back",
    ),
    # sizes, with their bound and cost
    "steps beyond any run": ("trainer.max_steps=10000000000", "the 1,000,000,000 allowed: even at 1,000 steps/s"),
    "D steps beyond any recipe": ("trainer.d_steps=1000", "1,001 times as long"),
    "a progress grid of a million images": ("trainer.grid_size=1000000", "one PNG of 1,000,000 images"),
    "a batch too large for memory": ("trainer.batch_size=100000000", "GiB to train"),
    "thousands of decode processes": ("dataset.num_workers=100000", "each worker is a process"),
    "attributes of a data set without them": ("dataset.attributes=[Smiling]", "only CelebA has attributes"),
    "more attribute classes than faces to fill them": (
        "dataset=celeba dataset.attributes=[Male,Young,Smiling,Bald,Bangs,Blurry]",
        "more than the 5 allowed: k attributes make 2^k classes",
    ),
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_gan_train_refuses(case: str, tmp_path: Path, capsys):
    overrides, expected = TRAIN_CASES[case]
    run_dir = tmp_path / "run"
    args = [*FAST, "trainer.max_steps=2", *overrides.split(), f"hydra.run.dir={run_dir}"]
    if "max_steps=" in overrides or "epochs=" in overrides:
        args.remove("trainer.max_steps=2")
    assert_refused(cli.train_main, "gan-train", args, expected, capsys)
    assert not run_dir.exists()


def test_gan_train_evaluation_sizes_are_bounded(tmp_path: Path, capsys):
    """eval.* is read only with trainer.eval_every > 0; then its sizes are bounded like gan-eval's."""
    run_dir = tmp_path / "run"
    weights = f"eval.inception_weights={WEIGHTS if WEIGHTS.is_file() else REPO / 'README.md'}"
    args = [*FAST, "trainer.max_steps=2", "trainer.eval_every=2", weights, f"hydra.run.dir={run_dir}"]
    assert_refused(cli.train_main, "gan-train", [*args, "eval.n=10000000"], "eval.n=10,000,000 is more than", capsys)
    assert_refused(
        cli.train_main, "gan-train", [*args, "eval.metrics=[fid]", "eval.kid_subsets=10"], "KID is not measured", capsys
    )
    assert not run_dir.exists()


def test_values_that_do_have_their_effect_are_still_accepted():
    """The refusals compare with the defaults: the shipped presets and recipes, and betas an optimizer file sets
    for a class without them, are not refused."""
    from dcgan.config import compose, validate_train

    for overrides in (
        ["preset=keras_mnist", "trainer.max_steps=3"],  # a preset's epochs beside max_steps: max_steps wins
        ["optimizer.generator.name=SGD"],  # adam.yaml's betas, not the user's
        ["recipe=lazy_r1"],
        ["recipe=ema_late"],
        ["loss=wgan_gp", "loss.gp_weight=5", "discriminator.norm=none"],
        ["discriminator.dropout=0.2"],
    ):
        validate_train(compose("train", overrides))


# ---------------------------------------------------------------- gan-sample: settings each mode reads

SAMPLE_CASES = {
    "truncation on export": ("mode=export truncation=0.7", "truncation=0.7 would have no effect: mode=export"),
    "seeds on export": ("mode=export seeds=1-3", "mode=export does not use it"),
    "seeds for a grid": ("seeds=1-3", "seeds=1-3 would have no effect: mode=grid"),
    "n beside seeds": ("mode=seeds seeds=1-3 n=5", "mode=seeds with seeds=1-3 does not use it"),
    "neighbours for a grid": ("k=3", "k=3 would have no effect: mode=grid"),
    "frame rate for a still interpolation": ("mode=interpolate out=walk.png fps=24", "fps=24 would have no effect"),
    "format for a grid": ("format=onnx", "format=onnx would have no effect"),
    "infinite truncation": ("truncation=inf", "truncation must be a finite number"),
    "frames beyond the image bound": ("mode=interpolate frames=100000000", "would make 200,000,000 images"),
    "a frame rate a GIF can't play": ("mode=interpolate fps=1000", "fps=1,000 is more than the 50 allowed"),
    "neighbours beyond the bound": ("mode=neighbors seeds=0-1 k=100000", "k=100,000 is more than the 100 allowed"),
    "a grid larger than memory": ("n=999999 seed=0", None),  # None: the message depends on this machine's RAM
}


@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_gan_sample_refuses(case: str, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    overrides, expected = SAMPLE_CASES[case]
    if expected is None:  # 999,999 images of 28 px need 2.9 GiB as float32: shrink "this machine's RAM" below that
        from dcgan import models

        monkeypatch.setattr(models, "device_memory", lambda device: ("this machine's RAM", 2**30))
        expected = "999,999 images of 28px need 3 GiB as float32, more than the 1 GiB of this machine's RAM"
    args = [f"ckpt={CHECKPOINT}", "device=cpu", *overrides.split()]
    assert_refused(cli.sample_main, "gan-sample", args, expected, capsys)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- gan-eval and gan-report

EVAL_CASES = {
    "more images than the bound": ("n=1000000", "n=1,000,000 is more than the 200,000 allowed"),
    "an Inception batch beyond memory": ("batch_size=100000", "GiB for its input alone"),
    "KID settings without KID": ("metrics=[fid] kid_subset_size=50", "KID is not measured"),
}


@pytest.mark.parametrize("case", EVAL_CASES)
def test_gan_eval_refuses_before_measuring(case: str, tmp_path: Path, capsys):
    overrides, expected = EVAL_CASES[case]
    out = tmp_path / "scores.json"
    args = [f"ckpt={CHECKPOINT}", "device=cpu", f"out={out}", *overrides.split()]
    assert_refused(cli.eval_main, "gan-eval", args, expected, capsys)
    assert not any(tmp_path.iterdir())


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    """What gan-report reads: metrics rows and two progress grids."""
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    rows = [{"step": step, "loss_d": 1.0, "loss_g": 2.0} for step in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for step in (1, 2):
        Image.fromarray(np.full((8, 8), 40 * step, np.uint8), "L").save(run / "samples" / f"step_{step:06d}.png")
    return run


def test_gan_report_refuses_a_frame_rate_a_gif_cannot_play(run_folder: Path, capsys):
    before = sorted(p.name for p in run_folder.iterdir())
    assert_refused(cli.report_main, "gan-report", [f"run={run_folder}", "fps=120"], "the 50 allowed", capsys)
    assert sorted(p.name for p in run_folder.iterdir()) == before


@pytest.mark.parametrize(
    "spelling, expected",
    [("+fpss=3", "unknown config key fpss: did you mean fps?"), ("out=${nope}", "key 'nope' not found")],
)
def test_gan_report_refuses_what_it_would_not_read(spelling: str, expected: str, run_folder: Path, capsys):
    before = sorted(p.name for p in run_folder.iterdir())
    assert_refused(cli.report_main, "gan-report", [f"run={run_folder}", spelling], expected, capsys)
    assert sorted(p.name for p in run_folder.iterdir()) == before
