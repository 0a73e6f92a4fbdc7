"""Checkpoints written before the package's modules were reorganized still sample and resume.

tests/fixtures/checkpoint_format1.pt: 4 steps of `gan-train` at commit 82becfd (the last layout with
health.py and the CLI inside train.py), generator.width=0.125, discriminator.width=0.125,
generator.z_dim=16, batch 16, on the shipped MNIST subset.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from dcgan import checkpoint

from conftest import REPO, run_cli

OLD = REPO / "tests" / "fixtures" / "checkpoint_format1.pt"
SAME_NETWORKS = ["generator.width=0.125", "discriminator.width=0.125", "generator.z_dim=16"]


def test_an_old_checkpoint_samples_and_resumes(tmp_path: Path):
    run_cli("gan-sample", [f"ckpt={OLD}", "n=16", "nrow=4", f"out={tmp_path / 'grid.png'}", "device=cpu"], cwd=tmp_path)
    assert Image.open(tmp_path / "grid.png").size == (4 * 30 + 2, 4 * 30 + 2)  # 28-px images, 2-px padding

    run = tmp_path / "run"
    args = [
        "trainer.device=cpu",
        "trainer.progress=false",
        "trainer.batch_size=16",
        "trainer.max_steps=6",
        "trainer.ckpt_every=2",
        "trainer.log_every=2",
        "trainer.sample_every=6",
        *SAME_NETWORKS,
    ]
    run_cli("gan-train", [*args, f"trainer.resume={OLD}", f"hydra.run.dir={run}"], cwd=tmp_path)
    resumed = checkpoint.load(run / "checkpoints" / "last.pt")
    assert resumed["step"] == 6 and checkpoint.load(OLD)["step"] == 4
