"""Reliability: each way a long run fails is injected for real, and each ends as promised with nothing lost.

Signals and SIGKILL hit real training processes; NaN comes from a learning rate that truly diverges, a
collapse from a D that truly overpowers G (or a G whose learning rate makes every sample the same);
bad images are real files. A full disk is the one fault simulated (os.fsync raising ENOSPC), beside a
real unwritable output path; a patched os.fsync also times one real Ctrl-C to land mid-write. No
test-only hook exists in the package. Every run here is single-threaded: the machine is shared, and
bit-exact comparisons between this process and gan-train subprocesses need one thread count on both.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from dcgan import checkpoint, cli, data, runcard
from dcgan.config import compose
from dcgan.data import DatasetConfig
from dcgan.errors import DIVERGED_EXIT, UserError
from dcgan.guard import Guard, HealthConfig, diversity, tensors_in
from dcgan.layout import RunFolder
from dcgan.train import train

from conftest import BIN, FAST, assert_same_training, run_cli

STEPS = 100  # the length of the runs that are interrupted and compared with an uninterrupted one


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # for the gan-train subprocesses
        yield
    torch.set_num_threads(threads)


def train_in_process(overrides: List[str], run_dir: Path) -> Dict[str, Any]:
    """What gan-train runs once Hydra has made the run folder."""
    return cli.train_in_run_dir(compose("train", overrides), run_dir)


def logged_steps(metrics: Path) -> List[int]:
    """Steps of metrics.jsonl (also while a run appends to it)."""
    if not metrics.exists():
        return []
    steps = []
    for line in metrics.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:  # a line being written right now
            pass
    return steps


def card(run_dir: Path) -> Dict[str, Any]:
    return json.loads(RunFolder(run_dir).card.read_text())


def all_finite(state: Dict[str, Any]) -> bool:
    return all(torch.isfinite(t).all() for t in tensors_in(state) if t.is_floating_point())


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Dict[str, Any]:
    """STEPS uninterrupted steps: what every interrupted run must end up with exactly."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    train(compose("train", [*FAST, f"trainer.max_steps={STEPS}"]), run_dir)
    return {
        "state": checkpoint.load(run_dir / "checkpoints" / "last.pt"),
        "steps": logged_steps(run_dir / "metrics.jsonl"),
    }


# ---------------------------------------------------------------- signals


def stop_with_signal(args: List[str], cwd: Path, metrics: Path, after_step: int, signum: int) -> Tuple[int, str]:
    """Start gan-train, send `signum` once it has logged a row past `after_step`; (exit code, output)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(
        [str(BIN / "gan-train"), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 240
    while not any(step > after_step for step in logged_steps(metrics)):
        assert process.poll() is None, f"gan-train ended before the signal:\n{process.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "gan-train logged nothing for 240 s"
        time.sleep(0.02)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=240)
    return process.returncode, output


def test_sigterm_finishes_the_step_saves_and_resumes_exactly(tmp_path: Path, straight: Dict[str, Any]):
    run = tmp_path / "run"
    # ckpt_every is beyond the run: the only checkpoint before the end is the one the signal causes.
    args = [*FAST, f"trainer.max_steps={STEPS}", "trainer.ckpt_every=1000", f"hydra.run.dir={run}"]
    code, output = stop_with_signal(args, tmp_path, run / "metrics.jsonl", 0, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM == 143, output[-3000:]
    assert "stopped by signal 15" in output and "Traceback" not in output
    assert f"plus trainer.resume=auto hydra.run.dir={run}" in output  # the default folder is new on every run
    stopped = checkpoint.load(run / "checkpoints" / "last.pt")["step"]
    # The step it was in finished, logged a last row and was checkpointed.
    assert 0 < stopped < STEPS and logged_steps(run / "metrics.jsonl")[-1] == stopped
    assert (card(run)["status"], card(run)["signal"], card(run)["final_step"]) == (
        "interrupted",
        signal.SIGTERM,
        stopped,
    )

    run_cli("gan-train", [*args, "trainer.resume=auto"], cwd=tmp_path)
    assert_same_training(checkpoint.load(run / "checkpoints" / "last.pt"), straight["state"])
    # One continuous log: the straight run's rows plus the row the stop wrote, none twice.
    assert logged_steps(run / "metrics.jsonl") == sorted(set(straight["steps"]) | {stopped})
    assert card(run)["status"] == "completed" and [c["status"] for c in card(run)["previous"]] == ["interrupted"]
    assert not list((run / "checkpoints").glob(".*.tmp"))


def test_ctrl_c_during_a_checkpoint_write_lets_the_write_finish(tmp_path: Path, monkeypatch):
    real_fsync = os.fsync

    def fsync_then_ctrl_c(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".step_000003.pt.tmp"):
            os.kill(os.getpid(), signal.SIGINT)  # mid-write: the bytes are out, the renames still to come
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_then_ctrl_c)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit:
        train_in_process([*FAST, "trainer.max_steps=20", "trainer.ckpt_every=3"], run)
    assert exit.value.code == 128 + signal.SIGINT == 130
    checkpoints = run / "checkpoints"
    assert checkpoint.load(checkpoints / "step_000003.pt")["step"] == 3  # the interrupted write completed
    # The signal came after step 3's training: the loop saw it at the next step, which it finished and saved.
    assert checkpoint.load(checkpoints / "last.pt")["step"] == 4
    assert not list(checkpoints.glob(".*.tmp"))
    assert (card(run)["status"], card(run)["signal"], card(run)["final_step"]) == ("interrupted", signal.SIGINT, 4)


# The kill harness: one Python process imports torch once, then forks children that run train() with
# resume=auto and kills each with SIGKILL after a random delay (startup, training steps, checkpoint
# writes: with ckpt_every=1 most of a step is its checkpoint write). After each kill it reports what a
# new run would find on disk. Children are forked, not started, so a kill costs a fraction of a second.
KILL_HARNESS = r"""
import json, os, random, signal, sys, time
from pathlib import Path
import torch
import torchvision
torch.set_num_threads(1)  # a forked child must not inherit a running OpenMP pool
from dcgan import checkpoint
from dcgan.config import compose
from dcgan.train import train

args = json.loads(sys.argv[1])
cfg = compose("train", args["overrides"])
run_dir = Path(args["run_dir"])
delays = random.Random(args["seed"])


def run_child(kill_after):
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1), os.dup2(null, 2)
        code = 1
        try:
            train(cfg, run_dir)
            code = 0
        finally:
            os._exit(code)
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def on_disk():
    folder = run_dir / "checkpoints"
    seen = {"last": None, "steps": [], "unloadable": [],
            "temporaries": sorted((p.name, p.stat().st_mtime_ns) for p in folder.glob(".*.tmp"))
            if folder.is_dir() else []}
    for path in [folder / "last.pt", *checkpoint.step_checkpoints(folder)]:
        if path.exists():
            try:
                step = checkpoint.load(path)["step"]
            except Exception as error:
                seen["unloadable"].append(f"{path.name}: {error}")
                continue
            if path.name == "last.pt":
                seen["last"] = step
            else:
                seen["steps"].append(step)
    latest = checkpoint.latest(folder)
    seen["latest"] = latest.name if latest else None
    return seen


warm = compose("train", args["overrides"] + ["trainer.max_steps=1", "trainer.resume=null"])
train(warm, Path(args["warm_dir"]))  # pays every lazy import once, here, instead of in each child
for _ in range(args["kills"]):
    delay = delays.uniform(0, args["max_delay_s"])
    status = run_child(delay)
    print(json.dumps({"delay": delay, "killed": os.WIFSIGNALED(status), **on_disk()}), flush=True)
status = run_child(None)
print(json.dumps({"final_exit": os.waitstatus_to_exitcode(status), **on_disk()}), flush=True)
"""


def test_random_sigkills_never_lose_the_newest_checkpoint(tmp_path: Path, straight: Dict[str, Any]):
    run, keep_last, kills = tmp_path / "run", 2, 24
    overrides = [
        *FAST,
        f"trainer.max_steps={STEPS}",
        "trainer.ckpt_every=1",
        f"trainer.keep_last={keep_last}",
        "trainer.resume=auto",
    ]
    harness = {
        "overrides": overrides,
        "run_dir": str(run),
        "warm_dir": str(tmp_path / "warm"),
        "seed": 0,
        "kills": kills,
        "max_delay_s": 0.5,
    }
    result = subprocess.run(
        [sys.executable, "-c", KILL_HARNESS, json.dumps(harness)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rounds = [json.loads(line) for line in result.stdout.splitlines()]
    *killed, final = rounds
    assert len(killed) == kills and all(r["killed"] for r in killed)

    newest, mid_write, temporaries = 0, 0, set()
    for index, seen in enumerate(killed):
        where = f"after kill {index} ({seen})"
        assert not seen["unloadable"], where  # last.pt and every step file are always whole
        if seen["steps"]:
            assert seen["latest"] == "last.pt" and seen["last"] is not None, where
            # A kill between the step file's link and last.pt's rename leaves last.pt one checkpoint behind.
            assert seen["last"] >= max(seen["steps"]) - 1, where
            assert len(seen["steps"]) <= keep_last + 1, where  # killed before pruning: one extra at most
            assert seen["last"] >= newest, where  # nothing that was saved is ever lost
            newest = seen["last"]
        fresh = {tuple(t) for t in seen["temporaries"]} - temporaries
        mid_write += bool(fresh)
        temporaries |= fresh
    assert 0 < newest <= STEPS  # a slow machine may finish every step before the last kill

    # resume=auto after all of that ends exactly where an uninterrupted run does, with no litter.
    assert final["final_exit"] == 0 and final["last"] == STEPS and not final["temporaries"]
    # Every killed run that got as far as writing its run card is on record as such.
    killed_cards = [c["status"] for c in card(run)["previous"]]
    assert killed_cards and set(killed_cards) == {"killed or crashed (ended without a report)"}
    assert card(run)["status"] == "completed"
    assert_same_training(checkpoint.load(run / "checkpoints" / "last.pt"), straight["state"])
    assert logged_steps(run / "metrics.jsonl") == straight["steps"]
    if mid_write == 0:  # kills land at random times; on a slow, loaded machine none may hit a write
        pytest.skip(f"none of the {kills} kills landed inside a checkpoint write this time; the other checks passed")


# ---------------------------------------------------------------- divergence and collapse


def test_the_guard_reads_nothing_back_per_step(monkeypatch):
    """NaN detection costs no CPU-GPU sync per step: tensors are only read at log rows and checkpoints."""
    guard = Guard(HealthConfig(), torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8), torch.device("cpu"))
    D = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1))
    parts = SimpleNamespace(
        G=torch.nn.Linear(2, 2),
        D=D,
        G_ema=None,  # what Guard.healthy reads of a TrainingState
        opt_g=torch.optim.SGD(D.parameters()),
        opt_d=torch.optim.SGD(D.parameters()),
    )
    x = torch.randn(4, 1, 8, 8)

    def read_back(*args, **kwargs):
        raise AssertionError("a tensor was read back on the CPU during a step")

    with monkeypatch.context() as patch:
        for method in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"):
            patch.setattr(torch.Tensor, method, read_back)
        for _ in range(5):
            loss = D(x).mean()
            loss.backward()
            guard.watch("D", loss, D)
    assert guard.healthy(5, parts) and guard.trusted_step == 5

    loss = D(x).mean() * float("nan")  # a NaN injected into a loss, and from there into the gradients
    loss.backward()
    guard.watch("D", loss, D)
    assert not guard.healthy(6, parts)
    assert guard.fault.kind == "non-finite" and guard.fault.trusted_step == 5
    assert "D's loss and D's gradient between steps 5 and 6" in guard.fault.message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_guard_does_not_sync_the_gpu_per_step():
    device = torch.device("cuda")
    guard = Guard(HealthConfig(), torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8), device)
    D = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1)).to(device)
    parts = SimpleNamespace(
        G=D, D=D, G_ema=None, opt_g=torch.optim.SGD(D.parameters()), opt_d=torch.optim.SGD(D.parameters())
    )
    x = torch.randn(4, 1, 8, 8, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        for _ in range(5):
            loss = D(x).mean()
            loss.backward()
            guard.watch("D", loss, D)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert guard.healthy(5, parts)


def test_nan_stops_the_run_and_no_checkpoint_holds_it(tmp_path: Path, capsys):
    sgd = [*FAST, "trainer.ckpt_every=1", "optimizer.discriminator.name=SGD"]
    # SGD with lr=1e10 on D: its weights are Inf after one step, its loss NaN two steps later.
    run = tmp_path / "from_the_start"
    with pytest.raises(SystemExit) as exit:
        train_in_process([*sgd, "trainer.max_steps=20", "optimizer.discriminator.lr=1e10"], run)
    assert exit.value.code == DIVERGED_EXIT and "No healthy checkpoint is left" in capsys.readouterr().err
    assert not (run / "checkpoints" / "last.pt").exists() and not checkpoint.step_checkpoints(run / "checkpoints")

    # After a healthy start, gan-train stops at the first check after the NaN, with last.pt untouched.
    run = tmp_path / "run"
    train_in_process([*sgd, "trainer.max_steps=4", "optimizer.discriminator.lr=0.01"], run)
    healthy = (run / "checkpoints" / "last.pt").read_bytes()
    result = run_cli(
        "gan-train",
        [
            *sgd,
            "trainer.max_steps=20",
            "trainer.resume=auto",
            "optimizer.discriminator.lr=1e10",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == DIVERGED_EXIT, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("gan-train:")]
    assert len(errors) == 1 and errors[0].startswith("gan-train: diverged: at step 5, NaN or Inf in D's weights")
    assert (
        f"Last healthy checkpoint: {run / 'checkpoints' / 'step_000004.pt'}" in errors[0]
        and "trainer.resume=auto" in errors[0]
    )
    assert "Traceback" not in result.stderr
    fault = card(run)["health"]["fault"]
    assert card(run)["status"] == "diverged" and (fault["kind"], fault["step"], fault["trusted_step"]) == (
        "non-finite",
        5,
        4,
    )
    checkpoints = run / "checkpoints"
    assert (checkpoints / "last.pt").read_bytes() == healthy
    assert [checkpoint.step_of(p) for p in checkpoint.step_checkpoints(checkpoints)][-1] == 4
    assert all(all_finite(checkpoint.load(p)) for p in checkpoints.iterdir() if p.suffix == ".pt")


def test_nan_rolls_back_with_a_lower_learning_rate_and_recovers(tmp_path: Path):
    run = tmp_path / "run"
    common = [
        *FAST,
        "trainer.log_every=1",
        "trainer.ckpt_every=5",
        "trainer.keep_last=0",
        "optimizer.discriminator.name=SGD",
        "optimizer.discriminator.lr=0.01",
    ]
    train_in_process([*common, "trainer.max_steps=10"], run)  # healthy checkpoints at steps 5 and 10
    # Resumed with a learning rate that diverges within a few steps; the NaN is found at a log row.
    row = train_in_process(
        [
            *common,
            "trainer.max_steps=20",
            "trainer.resume=auto",
            "optimizer.discriminator.lr=1e10",
            "trainer.on_divergence=rollback",
            "trainer.health.rollback_lr_factor=1e-12",
        ],
        run,
    )

    assert row["step"] == 20 and all(np.isfinite(v) for v in row.values() if isinstance(v, float))
    diverged = card(run)["previous"][-1]
    assert diverged["status"] == "diverged" and diverged["health"]["fault"]["kind"] == "non-finite"
    assert 10 < diverged["health"]["fault"]["step"] < 20
    assert diverged["action"].startswith("rolled back to step 10 with learning rates x1e-12")
    last = checkpoint.load(run / "checkpoints" / "last.pt")
    assert last["step"] == 20 and all_finite(last) and last["health"]["rollbacks"] == 1
    assert last["optimizer_d"]["param_groups"][0]["lr"] == pytest.approx(1e10 * 1e-12)
    # The diverged steps' rows are gone: the log is the history of the weights that were kept.
    assert logged_steps(run / "metrics.jsonl") == list(range(1, 21))


def test_collapse_stops_with_the_last_healthy_checkpoint_kept(tmp_path: Path):
    run = tmp_path / "run"
    # D learns 50x faster than usual, G hardly at all: D wins outright within ten steps.
    args = [
        *FAST,
        "trainer.max_steps=60",
        "trainer.log_every=2",
        "trainer.ckpt_every=2",
        "trainer.keep_last=2",
        "trainer.sample_every=1000",
        "optimizer.discriminator.lr=0.01",
        "optimizer.generator.lr=1e-7",
        "trainer.health.collapse_steps=10",
    ]  # default thresholds otherwise: accuracy 0.99, G loss 10
    with pytest.raises(SystemExit) as exit:
        train_in_process(args, run)
    assert exit.value.code == DIVERGED_EXIT
    fault = card(run)["health"]["fault"]
    assert fault["kind"] == "collapse" and "D has won outright" in fault["message"]
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    healthy = fault["trusted_step"]
    assert not (rows[healthy]["d_accuracy"] >= 0.99 and rows[healthy]["loss_g"] >= 10)
    assert all(
        rows[s]["d_accuracy"] >= 0.99 and rows[s]["loss_g"] >= 10 for s in range(healthy + 2, fault["step"] + 1, 2)
    )
    assert fault["step"] - (healthy + 2) >= 10

    checkpoints = run / "checkpoints"
    # keep_last=2 would have pruned it long ago; the guard's trusted step kept it, and it is last.pt now.
    assert checkpoint.load(checkpoints / "last.pt")["step"] == healthy
    assert [checkpoint.step_of(p) for p in checkpoint.step_checkpoints(checkpoints)][-1] == healthy
    # The checkpoints written during the collapse are set aside, not deleted.
    suspect = sorted(checkpoint.step_of(p) for p in RunFolder(run).suspect.glob("step_*.pt"))
    assert suspect == [fault["step"] - 4, fault["step"] - 2]


def test_lost_diversity_rolls_back_a_bounded_number_of_times(tmp_path: Path):
    run = tmp_path / "run"
    common = [*FAST, "trainer.sample_every=2", "trainer.ckpt_every=2", "trainer.keep_last=0"]
    train_in_process([*common, "trainer.max_steps=24"], run)  # a healthy start, varied grids by its end
    # Adam with lr=1 on G: within a few steps every sample of the fixed-noise grid is the same image.
    # Rollbacks lower it to 0.9, which collapses too; after max_rollbacks=1 the run stops.
    with pytest.raises(SystemExit) as exit:
        train_in_process(
            [
                *common,
                "trainer.max_steps=80",
                "trainer.resume=auto",
                "optimizer.generator.lr=1",
                "trainer.on_divergence=rollback",
                "trainer.health.rollback_lr_factor=0.9",
                "trainer.health.max_rollbacks=1",
                "trainer.health.collapse_steps=6",
            ],
            run,
        )
    assert exit.value.code == DIVERGED_EXIT
    first, second = card(run)["previous"][-1], card(run)
    assert first["health"]["fault"]["kind"] == second["health"]["fault"]["kind"] == "diversity"
    rolled_back_to = first["health"]["fault"]["trusted_step"]
    assert first["action"].startswith(f"rolled back to step {rolled_back_to} with learning rates x0.9")
    assert second["health"]["rollbacks"] == 1 and "1 rollback(s) did not help" in second["action"]
    # It failed again before getting past the first fault, so it stopped one checkpoint further back.
    last = checkpoint.load(run / "checkpoints" / "last.pt")
    assert last["step"] == rolled_back_to - 2 and second["healthy_checkpoint"].endswith(
        checkpoint.step_name(last["step"])
    )
    assert diversity(torch.zeros(3, 1, 4, 4)) == 0.0


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.on_divergence=retry", "trainer.on_divergence must be one of stop, rollback"),
        ("trainer.health.rollback_lr_factor=2", "trainer.health.rollback_lr_factor must be in (0, 1)"),
        ("trainer.health.collapse_steps=-1", "trainer.health.collapse_steps must be >= 0"),
    ],
)
def test_bad_health_settings_are_refused_before_any_output(override: str, expected: str, tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.train_main([override, f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and expected in err and err.count("\n") == 1 and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- data


def write_images(folder: Path) -> int:
    """Good images in several Pillow modes, plus a zero-byte, a corrupt and a truncated file; returns the good count."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    modes = {"L": (20, 20), "RGB": (20, 20, 3), "RGBA": (20, 20, 4), "I;16": (20, 20)}
    for index in range(8):
        mode = list(modes)[index % len(modes)]
        pixels = rng.integers(0, 65535 if mode == "I;16" else 255, modes[mode]).astype(
            np.uint16 if mode == "I;16" else np.uint8
        )
        Image.fromarray(pixels).save(folder / f"good_{index}.png")  # the dtype and shape pick the mode
    Image.new("RGB", (20, 20), (200, 10, 10)).convert("P").save(folder / "good_palette.png")
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(folder / "good_cmyk.jpg")
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 255, 200, dtype=np.uint8)))
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return 10


def test_bad_images_are_named_before_training_and_the_run_completes(tmp_path: Path):
    folder, run = tmp_path / "photos", tmp_path / "run"
    good = write_images(folder / "faces")  # a class folder, as torchvision's ImageFolder wants
    files_before = sorted(path.relative_to(folder) for path in folder.rglob("*"))
    run_cli(
        "gan-train",
        [
            *FAST,
            "dataset=folder",
            f"dataset.root={folder}",
            "dataset.image_size=16",
            "trainer.batch_size=4",
            "trainer.max_steps=3",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
    )
    log_lines = (run / "train.log").read_text().splitlines()
    warning = next(i for i, line in enumerate(log_lines) if "unreadable image files" in line)
    assert all(name in log_lines[warning] for name in ("zero.jpg", "corrupt.png", "truncated.jpg"))
    assert warning < next(i for i, line in enumerate(log_lines) if "data:" in line)  # before training started
    assert card(run)["data"]["count"] == good and card(run)["status"] == "completed"
    assert checkpoint.load(run / "checkpoints" / "last.pt")["step"] == 3
    # The data folder is still the user's alone: nothing was written into it, and other tools read it as before.
    assert sorted(path.relative_to(folder) for path in folder.rglob("*")) == files_before
    image_folder = torchvision.datasets.ImageFolder(str(folder))
    assert image_folder.classes == ["faces"] and len(image_folder) == len(files_before) - 1  # all but the folder

    # A folder where nothing is readable is rejected before anything is written.
    empty, run = tmp_path / "empty", tmp_path / "run_empty"
    empty.mkdir()
    (empty / "zero.jpg").write_bytes(b"")
    (empty / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(UserError, match="no images found in .*all 2 image files are unreadable"):
        train_in_process([*FAST, "dataset=folder", f"dataset.root={empty}", "dataset.image_size=16"], run)
    assert not (run / "checkpoints").exists() and not RunFolder(run).card.exists()


def test_a_damaged_decode_cache_is_decoded_again(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # this test's own cache folder
    folder = tmp_path / "photos"
    write_images(folder)
    cfg = DatasetConfig(name="folder", root=str(folder), image_size=16, channels=3)
    decoded = data.load_images(cfg).clone()
    (cache,) = data.cache_folder(cfg).glob("*.npy")
    cache.write_bytes(cache.read_bytes()[:300])  # cut short, as a kill during a copy would leave it
    assert torch.equal(data.load_images(cfg), decoded)


# ---------------------------------------------------------------- run card and deterministic mode


def test_run_card_records_what_makes_the_run_repeatable(tmp_path: Path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    for command in (
        ["init", "-q"],
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
    ):
        subprocess.run(["git", *command], cwd=project, check=True)
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(project)
    run = tmp_path / "run"
    try:
        train_in_process([*FAST, "trainer.max_steps=2", "trainer.deterministic=true", "trainer.seed=7"], run)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        with warnings.catch_warnings(record=True) as caught:  # an op with no deterministic kernel warns, not fails
            warnings.simplefilter("always")
            torch.zeros(3).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))
        assert any("does not have a deterministic implementation" in str(w.message) for w in caught)
    finally:
        runcard.use_deterministic_algorithms(False)

    written = card(run)
    assert (written["status"], written["start_step"], written["final_step"]) == ("completed", 0, 2)
    assert (written["seed"], written["deterministic"], written["command"], written["cwd"]) == (
        7,
        True,
        sys.argv,
        str(project),
    )
    assert written["git"] == {"revision": revision, "dirty": False}
    assert written["versions"]["torch"] == torch.__version__ and written["versions"]["cuda"] == torch.version.cuda
    assert "cudnn" in written["versions"] and written["device"].startswith("cpu")
    assert written["config"]["trainer"]["seed"] == 7 and written["config"]["trainer"]["deterministic"] is True
    images = data.load_images(compose("train", FAST).dataset)
    expected = hashlib.sha256(repr(tuple(images.shape)).encode() + images.numpy().tobytes()).hexdigest()
    assert written["data"] == {
        "count": 5000,
        "shape": [1, 28, 28],
        "sha256": expected,
        "hashed": "all pixels and the shape",
    }
    # Outside a repository there is simply no revision.
    assert runcard.git_revision(tmp_path) is None


def test_large_data_sets_are_fingerprinted_by_an_evenly_spaced_sample(monkeypatch):
    monkeypatch.setattr(runcard, "HASH_ALL_BYTES", 1000)
    monkeypatch.setattr(runcard, "SAMPLED_IMAGES", 5)
    images = torch.randint(0, 256, (101, 1, 8, 8), dtype=torch.uint8)
    before = runcard.data_fingerprint(images)
    assert before["hashed"] == "5 of 101 images, evenly spaced, and the shape" and before["count"] == 101
    sampled, skipped = images.clone(), images.clone()
    sampled[50] ^= 1  # images 0, 25, 50, 75 and 100 are hashed
    skipped[51] ^= 1
    assert runcard.data_fingerprint(sampled)["sha256"] != before["sha256"]
    assert runcard.data_fingerprint(skipped)["sha256"] == before["sha256"]


# ---------------------------------------------------------------- full disks and unwritable folders


def test_a_full_disk_during_a_checkpoint_keeps_the_earlier_ones(tmp_path: Path, monkeypatch):
    real_fsync = os.fsync

    def no_space_for_step_6(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".step_000006.pt.tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", no_space_for_step_6)
    run = tmp_path / "run"
    args = [*FAST, "trainer.max_steps=9", "trainer.ckpt_every=3"]
    with pytest.raises(UserError, match="No space left on device") as error:
        train_in_process(args, run)
    assert "earlier checkpoints are untouched" in str(error.value)
    checkpoints = run / "checkpoints"
    assert checkpoint.load(checkpoints / "last.pt")["step"] == 3
    assert [p.name for p in checkpoint.step_checkpoints(checkpoints)] == ["step_000003.pt"]
    assert not list(checkpoints.glob(".*.tmp"))
    assert card(run)["status"] == "failed" and "No space left on device" in card(run)["error"]

    # A full disk can also cut an append to metrics.jsonl short; once there is space, resuming copes.
    with open(run / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 6, "loss_d": 0.6')
    monkeypatch.setattr(os, "fsync", real_fsync)
    train_in_process([*args, "trainer.resume=auto"], run)
    assert checkpoint.load(checkpoints / "last.pt")["step"] == 9
    assert logged_steps(run / "metrics.jsonl") == [5, 9]


def test_an_unwritable_output_is_one_clear_line(tmp_path: Path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exit:
        cli.train_main([*FAST, "trainer.max_steps=2", f"hydra.run.dir={blocker / 'run'}"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("gan-train: error: hydra.run.dir=") and "is a file, not a folder" in err and err.count("\n") == 1
    )

    # A write that fails mid-run (here: a file where the samples folder goes) names the path, and the
    # checkpoints written before it stay.
    run = tmp_path / "run"
    (run / "samples" / "step_000010.png").mkdir(parents=True)  # in the way of the step-10 grid
    with pytest.raises(UserError, match=r"step_000010\.png.*; check that path .*trainer.resume=auto"):
        train_in_process([*FAST, "trainer.max_steps=10", "trainer.ckpt_every=5"], run)
    assert checkpoint.load(run / "checkpoints" / "last.pt")["step"] == 5
