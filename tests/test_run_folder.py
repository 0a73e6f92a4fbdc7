"""A run folder has one owner and holds one run: every way of losing or mixing a user's work, tried for real.

Each test runs the installed gan-train on the shipped MNIST subset and checks that a refused invocation
changed no file of the folder (`snapshot` hashes every file, Hydra's record included).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict

import pytest
import torch

from dcgan import checkpoint

from conftest import BIN, FAST, run_cli

STEPS = ["trainer.max_steps=10"]


def snapshot(folder: Path) -> Dict[str, str]:
    """Every file's hash, but the lock's, which records its latest owner."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 10-step run with checkpoints at steps 5 and 10 (copied by each test that changes it)."""
    root = tmp_path_factory.mktemp("finished")
    run_cli("gan-train", [*FAST, *STEPS, "trainer.ckpt_every=5", f"hydra.run.dir={root / 'run'}"], cwd=root)
    return root / "run"


@pytest.fixture
def run(finished_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def refused(args, cwd: Path) -> subprocess.CompletedProcess:
    result = run_cli("gan-train", args, cwd=cwd, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    return result


def test_resume_auto_refuses_checkpoints_it_cannot_read(run: Path, tmp_path: Path):
    checkpoints = run / "checkpoints"
    newer = checkpoint.load(checkpoints / "last.pt")
    torch.save(
        {**newer, "format_version": checkpoint.FORMAT_VERSION + 1}, checkpoints / "last.pt"
    )  # from a newer version
    (checkpoints / "step_000010.pt").write_bytes((checkpoints / "step_000010.pt").read_bytes()[:5000])  # truncated
    (checkpoints / "step_000005.pt").write_bytes(b"damaged" * 100)
    before = snapshot(run)
    result = refused([*FAST, "trainer.max_steps=20", "trainer.resume=auto", f"hydra.run.dir={run}"], tmp_path)
    assert "can resume none of them" in result.stderr
    assert "last.pt (written by a newer version" in result.stderr
    assert "step_000010.pt (unreadable" in result.stderr and "step_000005.pt (unreadable" in result.stderr
    assert snapshot(run) == before


def test_resume_auto_still_skips_a_damaged_last_for_a_good_step_file(run: Path, tmp_path: Path):
    (run / "checkpoints" / "last.pt").write_bytes(b"damaged")
    run_cli("gan-train", [*FAST, "trainer.max_steps=15", "trainer.resume=auto", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert checkpoint.load(run / "checkpoints" / "last.pt")["step"] == 15


def test_a_second_run_into_a_used_folder_is_refused_or_replaces_it_on_request(run: Path, tmp_path: Path):
    before = snapshot(run)
    result = refused([*FAST, "trainer.max_steps=3", f"hydra.run.dir={run}"], tmp_path)
    assert "already holds a run at step 10" in result.stderr
    assert "trainer.resume=auto" in result.stderr and "trainer.overwrite=true" in result.stderr
    assert snapshot(run) == before  # Hydra's record and log included: refused before Hydra starts

    # An explicit resume from an earlier checkpoint of the folder would overwrite the later ones, too.
    result = refused(
        [
            *FAST,
            "trainer.max_steps=12",
            f"trainer.resume={run / 'checkpoints' / 'step_000005.pt'}",
            f"hydra.run.dir={run}",
        ],
        tmp_path,
    )
    assert snapshot(run) == before

    run_cli("gan-train", [*FAST, "trainer.max_steps=3", "trainer.overwrite=true", f"hydra.run.dir={run}"], cwd=tmp_path)
    (replaced,) = (run / "replaced").iterdir()
    assert snapshot(replaced) == before  # the old run, whole, Hydra's record included
    assert checkpoint.load(run / "checkpoints" / "last.pt")["step"] == 3
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1] == 3
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == [
        "step_000000.png",
        "step_000003.png",
    ]  # no old grids beside new ones


def test_one_owner_per_folder_and_a_killed_owner_leaves_no_stale_lock(tmp_path: Path):
    run = tmp_path / "run"
    args = [*FAST, "trainer.max_steps=100000", "trainer.ckpt_every=5", f"hydra.run.dir={run}"]
    first = subprocess.Popen(
        [str(BIN / "gan-train"), *args], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 300
        while checkpoint.latest(run / "checkpoints") is None:
            assert first.poll() is None and time.time() < deadline, "the first run ended or never wrote a checkpoint"
            time.sleep(0.5)
        result = refused([*FAST, "trainer.max_steps=100000", "trainer.resume=auto", f"hydra.run.dir={run}"], tmp_path)
        assert f"pid {first.pid} on host {os.uname().nodename}" in result.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    step = checkpoint.load(checkpoint.latest(run / "checkpoints"))["step"]
    run_cli(
        "gan-train",
        [*FAST, f"trainer.max_steps={step + 5}", "trainer.resume=auto", f"hydra.run.dir={run}"],
        cwd=tmp_path,
    )
    assert checkpoint.load(run / "checkpoints" / "last.pt")["step"] == step + 5


def limit_file_size():
    """A full disk, for real: writes past 200 kB fail (EFBIG) in this process, as they would on a full file system."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_a_failed_checkpoint_write_is_one_line_leaves_no_temporary_file_and_is_named_on_resume(tmp_path: Path):
    run = tmp_path / "run"
    result = subprocess.run(
        [str(BIN / "gan-train"), *FAST, *STEPS, f"hydra.run.dir={run}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
        timeout=600,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    target = run / "checkpoints" / "step_000010.pt"
    assert f"could not write checkpoint {target}" in result.stderr and "MiB free there" in result.stderr
    assert list((run / "checkpoints").iterdir()) == []  # no temporary file left
    card = json.loads((run / "run_card.json").read_text())
    assert card["status"] == "failed" and str(target) in card["error"]

    again = run_cli("gan-train", [*FAST, *STEPS, "trainer.resume=auto", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert f"failed: could not write checkpoint {target}" in again.stdout + again.stderr
    assert checkpoint.load(run / "checkpoints" / "last.pt")["step"] == 10


def test_resume_refuses_another_optimizer_before_training(run: Path, tmp_path: Path):
    before = snapshot(run)
    result = refused(
        [*FAST, "trainer.max_steps=20", "trainer.resume=auto", "optimizer=rmsprop", f"hydra.run.dir={run}"], tmp_path
    )
    assert "optimizer.generator.name=Adam (now RMSprop)" in result.stderr
    result = refused(
        [
            *FAST,
            "trainer.max_steps=20",
            "trainer.resume=auto",
            "+optimizer.generator.extra.amsgrad=true",
            f"hydra.run.dir={run}",
        ],
        tmp_path,
    )
    assert "optimizer.generator.extra" in result.stderr
    assert snapshot(run) == before


def test_resume_applies_allowed_changes_and_says_which(run: Path, tmp_path: Path):
    changed = [
        "loss=hinge",
        "trainer.batch_size=8",
        "optimizer.discriminator.lr=1e-4",
        "optimizer.generator.betas=[0.0,0.99]",
    ]
    result = run_cli(
        "gan-train",
        [*FAST, "trainer.max_steps=12", "trainer.resume=auto", *changed, f"hydra.run.dir={run}"],
        cwd=tmp_path,
    )
    said = result.stdout + result.stderr
    for text in (
        "loss.name: ns -> hinge",
        "trainer.batch_size: 16 -> 8",
        "optimizer.discriminator.lr: 0.0002 -> 0.0001",
        "optimizer.generator.betas: [0.5, 0.999] -> [0.0, 0.99]",
    ):
        assert text in said
    card = json.loads((run / "run_card.json").read_text())
    assert card["resume_changes"]["loss.name"] == ["ns", "hinge"] and "trainer.max_steps" not in card["resume_changes"]
    state = checkpoint.load(run / "checkpoints" / "last.pt")
    assert state["optimizer_g"]["param_groups"][0]["betas"] == (0.0, 0.99)  # not the checkpoint's (0.5, 0.999)
    assert state["optimizer_d"]["param_groups"][0]["lr"] == pytest.approx(1e-4)
