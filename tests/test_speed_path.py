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
    """Epoch e: torch.randperm(N) under seed*1_000_003 + e, cut into global batches, this rank's slice, sorted."""
    count, batch_size, seed = 50, 8, 3
    batches = ImageBatches(numbered_images(count), batch_size, "cpu", seed, rank, world_size)
    per_epoch = count // (batch_size * world_size)
    for epoch in range(3):
        permutation = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        global_batches = permutation[: per_epoch * batch_size * world_size].view(per_epoch, world_size, batch_size)
        for expected in global_batches[:, rank]:
            assert image_ids(batches.next()) == sorted(expected.tolist())
    assert batches.state_dict() == {"epoch": 3, "position": 0}


def test_a_resumed_position_continues_the_same_order():
    images = numbered_images(40)
    straight = ImageBatches(images, 8, "cpu", seed=1)
    expected = [image_ids(straight.next()) for _ in range(12)]
    first = ImageBatches(images, 8, "cpu", seed=1)
    seen = [image_ids(first.next()) for _ in range(7)]
    resumed = ImageBatches(images, 8, "cpu", seed=1)
    resumed.load_state_dict(first.state_dict())
    seen += [image_ids(resumed.next()) for _ in range(5)]
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
        batches = [device.next() for _ in range(6)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [image_ids(b.cpu()) for b in batches] == [image_ids(host.next()) for _ in range(6)]
