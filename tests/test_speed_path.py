"""The fast path's pieces that run on any machine: the device-side batch order, and the CUDA-only checks.

The whole-step CUDA graph itself needs a GPU: those tests skip here, saying why.
"""

from __future__ import annotations

import pytest
import torch

from dcgan.data import ImageBatches

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs, device-resident data)")


def numbered_images(count: int) -> torch.Tensor:
    """Image i is filled with the value i, so a batch tells which images it holds."""
    return torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 1, 2, 2).contiguous()


def image_ids(batch: torch.Tensor) -> list:
    return ((batch[:, 0, 0, 0].float() + 1) * 127.5).round().long().tolist()


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_batches_follow_each_epochs_seeded_permutation(rank: int, world_size: int):
    """Epoch e: torch.randperm(N) under seed*1_000_003 + e, cut into global batches, this rank's slice, in order."""
    count, batch_size, seed = 50, 8, 3
    batches = ImageBatches(numbered_images(count), batch_size, "cpu", seed, rank, world_size)
    per_epoch = count // (batch_size * world_size)
    for epoch in range(3):
        permutation = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        global_batches = permutation[: per_epoch * batch_size * world_size].view(per_epoch, world_size, batch_size)
        for expected in global_batches[:, rank]:
            assert image_ids(batches.next()[0]) == expected.tolist()
    assert batches.state_dict() == {"epoch": 3, "position": 0, "batch_size": batch_size * world_size}


def test_a_resumed_position_continues_the_same_order():
    images = numbered_images(40)
    straight = ImageBatches(images, 8, "cpu", seed=1)
    expected = [image_ids(straight.next()[0]) for _ in range(12)]
    first = ImageBatches(images, 8, "cpu", seed=1)
    seen = [image_ids(first.next()[0]) for _ in range(7)]
    resumed = ImageBatches(images, 8, "cpu", seed=1)
    resumed.load_state_dict(first.state_dict())
    seen += [image_ids(resumed.next()[0]) for _ in range(5)]
    assert seen == expected


@needs_cuda
def test_device_batches_equal_host_batches_without_a_sync():
    images = numbered_images(64)
    host = ImageBatches(images, 8, "cpu", seed=5)
    device = ImageBatches(images, 8, torch.device("cuda"), seed=5)
    assert device.on_device
    device.next()  # the epoch's order moves to the GPU once, at the epoch's first batch
    host.next()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = [device.next()[0] for _ in range(6)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [image_ids(b.cpu()) for b in batches] == [image_ids(host.next()[0]) for _ in range(6)]


def test_the_graph_paths_step_function_trains_like_the_eager_one(tmp_path):
    """What a captured step runs (TrainStep.update with gradients zeroed in place and the EMA's step counter on
    the device) gives the eager step's weights: on the CPU, the same function, minus the capture."""
    from dcgan import train
    from dcgan.config import compose

    cfg = compose(
        "train",
        [
            "trainer.device=cpu",
            "trainer.batch_size=8",
            "generator.width=0.25",
            "discriminator.width=0.25",
            "dataset.max_images=64",
        ],
    )
    torch.set_num_threads(1)
    eager_state, eager_step, _ = train.build(cfg, torch.device("cpu"))
    graph_state, graph_step, _ = train.build(cfg, torch.device("cpu"))
    counter = torch.tensor(0.0)
    for _ in range(4):
        eager_step()
        reals = [graph_state.batches.next() for _ in range(cfg.trainer.d_steps)]
        graph_step.update(reals, counter, set_to_none=False)
        graph_state.step += 1
    assert counter.item() == 4
    for name, eager in eager_state.state_dict()["generator_ema"].items():
        assert torch.allclose(eager, graph_state.state_dict()["generator_ema"][name], atol=1e-6), name
    for eager, graph in zip(eager_state.G.parameters(), graph_state.G.parameters(), strict=True):
        assert torch.allclose(eager, graph, atol=1e-6)


def test_the_guards_flags_are_updated_in_place_across_checks():
    """A replayed graph writes into the flag tensors it captured: watch and the checks must keep using them."""
    from dcgan.guard import Guard, HealthConfig

    guard = Guard(HealthConfig(), numbered_images(8), torch.device("cpu"))
    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    guard.watch("G", torch.tensor(1.0), model)
    flags = dict(guard._finite)
    guard.check_row(10, {})
    guard.watch("G", torch.tensor(float("nan")), model)
    assert all(guard._finite[name] is flag for name, flag in flags.items())
    guard.check_row(20, {})
    assert guard.fault is not None and guard.fault.kind == "non-finite"


def test_cuda_graphs_stay_off_without_cuda_and_under_torchrun(monkeypatch):
    from dcgan import distributed, speed

    assert not speed.use_cuda_graphs(True, torch.device("cpu"))
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(0, 0, 2))
    assert not speed.use_cuda_graphs(True, torch.device("cuda"))


@needs_cuda
def test_the_captured_loop_does_not_sync_between_log_rows(tmp_path, monkeypatch):
    """The real loop with trainer.cuda_graphs=true: after the warm-up and the capture, steps between log rows
    run under torch.cuda.set_sync_debug_mode("error") (any host sync raises)."""
    from dcgan import speed, train
    from dcgan.config import compose

    original = speed.CapturedStep.__call__

    def strict(self):
        if self.graph is None:
            return original(self)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(self)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(speed.CapturedStep, "__call__", strict)
    cfg = compose(
        "train",
        [
            "trainer.device=cuda",
            "trainer.cuda_graphs=true",
            "trainer.max_steps=40",
            "trainer.log_every=20",
            "trainer.sample_every=1000",
            "trainer.ckpt_every=1000",
            "trainer.progress=false",
        ],
    )
    row = train.train(cfg, tmp_path / "run")
    assert row["step"] == 40 and row["loss_d"] == row["loss_d"]
