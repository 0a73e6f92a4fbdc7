"""What only a GPU can show: the real capture and replay, and where resumed step counts live on CUDA.

These skip on a CPU, saying why; scripts/gpu_check.py runs them on a GPU. Their CPU counterparts (the capture
rules, a failed or empty capture): tests/test_capture_rules.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dcgan import train
from dcgan.config import compose

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs, device step counts)")

SMALL = [
    "dataset=mnist_tiny",
    "trainer.device=cuda:0",
    "trainer.batch_size=32",
    "trainer.progress=false",
    "trainer.log_every=4",
    "trainer.sample_every=1000",
    "generator.width=0.25",
    "discriminator.width=0.25",
]


def step_devices(state) -> set:
    return {str(s["step"].device) for optimizer in (state.opt_g, state.opt_d) for s in optimizer.state.values()}


def test_the_step_is_captured_replayed_and_trains(tmp_path: Path):
    state, step, _ = train.build(compose("train", [*SMALL, "trainer.cuda_graphs=true"]), torch.device("cuda:0"))
    before = [p.detach().clone() for p in state.G.parameters()]
    for _ in range(8):
        step()
    assert step.graph is not None and not step.eager and step.counter.item() == 8
    assert all(not torch.equal(a, b) for a, b in zip(before, state.G.parameters(), strict=True))


@pytest.mark.parametrize(
    "saved, resumed, expected",
    [
        (["trainer.fused_optimizer=false"], ["trainer.cuda_graphs=true"], "cuda:0"),  # foreach -> captured
        ([], ["trainer.fused_optimizer=false"], "cpu"),  # fused -> foreach: read on the host, free there
    ],
    ids=["foreach checkpoint resumed with graphs", "fused checkpoint resumed with foreach"],
)
def test_resumed_step_counts_live_where_the_new_run_reads_them(saved, resumed, expected, tmp_path: Path):
    run = tmp_path / "run"
    train.train(compose("train", [*SMALL, *saved, "trainer.max_steps=4", "trainer.ckpt_every=4"]), run)
    cfg = compose("train", [*SMALL, *resumed, "trainer.max_steps=12", "trainer.resume=auto"])
    state, step, _ = train.build(cfg, torch.device("cuda:0"))
    train.resume(state, "auto", run / "checkpoints", cfg)
    assert step_devices(state) == {expected}
    row = train.train(cfg, run)  # and it trains on from there (with graphs: captured)
    assert row["step"] == 12 and row["loss_d"] == row["loss_d"]
