"""gan-train under torchrun (DDP, gloo on CPU): one job, one run folder, the same result as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from dcgan import checkpoint

from conftest import BIN, run_cli

# BatchNorm-free networks: without SyncBatchNorm (CUDA only) each rank normalizes its own half batch,
# which one process can't reproduce; with these, N ranks must compute exactly one process's update.
# SGD, because Adam's first steps move each weight by about lr * sign(gradient), which turns the last-bit
# differences of a differently ordered sum into whole steps wherever a gradient is near zero. fp32 (amp=off),
# for the same reason: bf16 autocast (auto's choice on a CPU with AVX512-BF16) rounds those sums coarsely.
SMALL = [
    "trainer.amp=off",
    "optimizer.generator.name=SGD",
    "optimizer.discriminator.name=SGD",
    "optimizer.generator.lr=0.01",
    "optimizer.discriminator.lr=0.01",
    "generator=keras_mnist",
    "discriminator=keras_mnist",
    "generator.width=0.25",
    "discriminator.width=0.25",
    "trainer.batch_size=16",
    "trainer.log_every=2",
    "trainer.ckpt_every=4",
    "trainer.device=cpu",
    "trainer.progress=false",
    "trainer.ema=0.9",
]


def torchrun(
    args: list, cwd: Path, nproc: int = 2, timeout: float = 240, check: bool = True
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", "--standalone", str(BIN / "gan-train"), *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6):
    for part in ("generator", "discriminator", "generator_ema"):
        for key, value in a[part].items():
            assert torch.allclose(value.float(), b[part][key].float(), atol=atol, rtol=1e-5), (part, key)


def test_two_ranks_match_one_process(tmp_path: Path):
    """Class-conditional (the unconditional step is the same loop without labels; the tests below run it): each rank
    takes its slice of the batch's labels, as of its images, so two ranks train as one process does."""
    torchrun([*SMALL, "trainer.max_steps=8", "conditional=true"], cwd=tmp_path)
    # Rank 0 chose the one run folder (Hydra's dated default) and every output is in it.
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1, runs
    ddp_dir = runs[0]
    assert (ddp_dir / ".hydra" / "config.yaml").is_file() and (ddp_dir / "samples" / "step_000008.png").is_file()
    rows = [json.loads(line) for line in (ddp_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]  # one writer: no duplicated rows

    single_dir = tmp_path / "single"
    run_cli("gan-train", [*SMALL, "trainer.max_steps=8", "conditional=true", f"hydra.run.dir={single_dir}"], tmp_path)
    ddp = checkpoint.load(ddp_dir / "checkpoints" / "last.pt")
    assert ddp["classes"] == [str(digit) for digit in range(10)]
    single = checkpoint.load(single_dir / "checkpoints" / "last.pt")
    # Both ranks held identical G, D and EMA weights at every checkpoint.
    assert len(ddp["replica_checksums"]) == 2 and len(set(ddp["replica_checksums"])) == 1
    assert_same_weights(ddp, single)
    single_rows = [json.loads(line) for line in (single_dir / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows, single_rows, strict=False):
        assert abs(a["loss_d"] - b["loss_d"]) < 1e-4 and abs(a["loss_g"] - b["loss_g"]) < 1e-4

    # The DDP checkpoint is an ordinary one: gan-sample reads it in a single process.
    run_cli("gan-sample", [f"ckpt={ddp_dir / 'checkpoints' / 'last.pt'}", "n=4", "class=7", "out=g.png"], tmp_path)
    assert (tmp_path / "g.png").is_file()


def test_resume_under_ddp(tmp_path: Path):
    run = tmp_path / "run"
    torchrun([*SMALL, "trainer.max_steps=4", f"hydra.run.dir={run}"], cwd=tmp_path)
    torchrun([*SMALL, "trainer.max_steps=8", "trainer.resume=auto", f"hydra.run.dir={run}"], cwd=tmp_path)
    straight = tmp_path / "straight"
    run_cli("gan-train", [*SMALL, "trainer.max_steps=8", f"hydra.run.dir={straight}"], cwd=tmp_path)
    resumed = checkpoint.load(run / "checkpoints" / "last.pt")
    assert resumed["step"] == 8
    assert_same_weights(resumed, checkpoint.load(straight / "checkpoints" / "last.pt"))


def test_default_batchnorm_networks_checkpoint_and_resume_under_ddp(tmp_path: Path):
    # Each rank's BatchNorm statistics follow its own half batch; the checkpoint takes rank 0's for G and D,
    # and the EMA generator's are measured on the same fixed latents on every rank, so the replicas agree.
    run = tmp_path / "run"
    common = [
        "generator.width=0.25",
        "discriminator.width=0.25",
        "trainer.batch_size=16",
        "trainer.ckpt_every=2",
        "trainer.log_every=2",
        "trainer.device=cpu",
        "trainer.progress=false",
        f"hydra.run.dir={run}",
    ]
    torchrun([*common, "trainer.max_steps=2"], cwd=tmp_path)
    torchrun([*common, "trainer.max_steps=4", "trainer.resume=auto"], cwd=tmp_path)
    state = checkpoint.load(run / "checkpoints" / "last.pt")
    assert state["step"] == 4 and len(set(state["replica_checksums"])) == 1
    assert any(key.endswith("running_mean") for key in state["discriminator"])  # the networks do have BatchNorm
    ema = {k: v for k, v in state["generator_ema"].items() if k.endswith("running_mean")}
    assert ema and all(not torch.equal(v, state["generator"][k]) for k, v in ema.items())  # measured, not copied


def test_global_batch_must_split_evenly(tmp_path: Path):
    result = torchrun(
        [*SMALL, "trainer.batch_size=15", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'r'}"],
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode != 0 and "multiple of 2" in result.stderr


def test_a_dead_rank_ends_the_job(tmp_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        str(BIN / "torchrun"),
        "--nproc_per_node=2",
        "--standalone",
        str(BIN / "gan-train"),
        *SMALL,
        "trainer.max_steps=100000",
        "trainer.dist_timeout_s=30",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    job = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # Kill only once a checkpoint is on disk, so the test can check that it survives the failure.
        checkpoints = tmp_path / "run" / "checkpoints"
        deadline = time.time() + 120
        while checkpoint.latest(checkpoints) is None and time.time() < deadline:
            assert job.poll() is None, job.stderr.read()[-2000:]
            time.sleep(0.5)
        assert checkpoint.latest(checkpoints) is not None, "no checkpoint within 120 s"
        workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[-1]), signal.SIGKILL)
        killed_at = time.time()
        job.wait(timeout=90)
        assert job.returncode != 0
        assert time.time() - killed_at < 90
    finally:
        if job.poll() is None:
            job.kill()
    # What was written before the failure is intact.
    assert checkpoint.latest(checkpoints) is not None
