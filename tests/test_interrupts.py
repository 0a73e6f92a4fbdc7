"""Stop signals are owned everywhere, sweeps never destroy what an earlier sweep wrote, and schedules follow
the run's stored progress, not the clock of one invocation.

The signals are real: sent to the process group, as Ctrl-C in a terminal sends them, to gan-train
started in a session of its own.
"""

from __future__ import annotations

import json
import logging
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from dcgan import __main__ as entry_points
from dcgan import checkpoint, errors, report, schedule, supervise, train
from dcgan.config import compose

from conftest import BIN, FAST, run_cli

SWEEP = [*FAST, "sweep.objective=loss_g", "trainer.log_every=2", "trainer.ckpt_every=1000"]


def start(args: List[str], cwd: Path, program: str = "gan-train") -> subprocess.Popen:
    """A command in a process group of its own, as a shell runs a foreground job."""
    command = [str(BIN / program)] if program else [sys.executable, "-m", "dcgan"]
    return subprocess.Popen(
        [*command, *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def wait_for(condition, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def card(folder: Path) -> Dict:
    return json.loads((folder / "run_card.json").read_text())


def training(folder: Path) -> bool:
    return (folder / "metrics.jsonl").is_file() and (folder / "metrics.jsonl").stat().st_size > 0


LAUNCHERS = {  # the launcher's overrides, and the jobs that begin before a Ctrl-C (of three)
    "basic": ([], 1),
    "joblib": (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], 2),
    # submitit's local controller would kill its tasks a second after a Ctrl-C: the jobs must checkpoint anyway
    "submitit_local": (["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"], 3),
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_ctrl_c_to_a_sweep_checkpoints_every_started_job_and_resume_continues(launcher: str, tmp_path: Path):
    plugin = {"joblib": "hydra_joblib_launcher", "submitit_local": "hydra_submitit_launcher"}.get(launcher)
    if plugin:
        pytest.importorskip(f"hydra_plugins.{plugin}", reason="pip install '.[sweep]' '.[slurm]'")
    parallel, begun = LAUNCHERS[launcher]
    grid = ["loss=ns,hinge,lsgan", f"hydra.sweep.dir={tmp_path}"]
    sweep = start(["-m", *parallel, *SWEEP, "trainer.max_steps=100000", *grid], tmp_path)
    started = [tmp_path / str(job) for job in range(begun)]
    wait_for(lambda: all(training(folder) for folder in started))
    os.killpg(sweep.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group, launcher workers included
    _, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("gan-train: stopped by SIGINT"), err
    assert "hydra.run.dir=" not in err  # a job is continued by its sweep, named by its folder, not by a run folder
    if launcher == "basic":  # the jobs' own lines (the other launchers' workers may keep theirs)
        assert f"trainer.resume=auto hydra.sweep.dir={tmp_path}" in err
    for folder in started:  # each started job: checkpointed, and its run card says so
        assert (folder / "checkpoints" / "last.pt").is_file() and card(folder)["status"] == "interrupted"
    if begun < 3:
        assert not (tmp_path / "2" / "checkpoints").exists()  # the last job never began
    steps = {f.name: checkpoint.load(f / "checkpoints" / "last.pt")["step"] for f in started}

    # The same sweep again continues it: stopped jobs resume (with a step budget they have reached already,
    # which is a result, not an error), the job that never began trains, and no score is lost.
    result = run_cli(
        "gan-train", ["-m", *parallel, *SWEEP, "trainer.max_steps=2", "trainer.resume=auto", *grid], tmp_path
    )
    assert "Traceback" not in result.stderr
    summary = {r["job"]: r for r in json.loads((tmp_path / "sweep_summary.json").read_text())}
    assert sorted(summary) == ["0", "1", "2"] and all(r["status"] == "completed" for r in summary.values())
    for name, step in steps.items():
        assert checkpoint.load(tmp_path / name / "checkpoints" / "last.pt")["step"] == step  # not retrained
    assert card(tmp_path / "2")["status"] == "completed"  # trained now, or continued with nothing left


def test_a_sweep_rerun_into_its_folder_keeps_its_scores(tmp_path: Path):
    grid = ["-m", *SWEEP, "trainer.max_steps=2", "loss=ns,hinge", f"hydra.sweep.dir={tmp_path}"]
    run_cli("gan-train", grid, tmp_path)
    scores = json.loads((tmp_path / "sweep_summary.json").read_text())
    hydra_record = (tmp_path / "0" / ".hydra" / "overrides.yaml").read_bytes()

    refused = run_cli("gan-train", grid, tmp_path, check=False)  # no resume, no overwrite: nothing is touched
    assert refused.returncode == 2 and "2 job folder(s) of this sweep already hold a run" in refused.stderr
    assert (tmp_path / "0" / ".hydra" / "overrides.yaml").read_bytes() == hydra_record
    assert json.loads((tmp_path / "sweep_summary.json").read_text()) == scores

    # The grid in another order: folder 0 holds loss=ns's run, which must not be continued as loss=hinge's job.
    reordered = [arg.replace("loss=ns,hinge", "loss=hinge,ns") for arg in grid]
    refused = run_cli("gan-train", [*reordered, "trainer.resume=auto"], tmp_path, check=False)
    assert refused.returncode == 2 and f"{tmp_path / '0'} holds the run of another job (loss=ns)" in refused.stderr
    assert (tmp_path / "0" / ".hydra" / "overrides.yaml").read_bytes() == hydra_record
    assert json.loads((tmp_path / "sweep_summary.json").read_text()) == scores

    continued = run_cli("gan-train", [*grid, "trainer.resume=auto"], tmp_path)  # finished: the stored scores
    assert (continued.stdout + continued.stderr).count("as measured before") == 2
    again = {r["job"]: r["value"] for r in json.loads((tmp_path / "sweep_summary.json").read_text())}
    assert again == {r["job"]: r["value"] for r in scores}

    hydra_record = (tmp_path / "0" / ".hydra" / "overrides.yaml").read_bytes()  # the continuation's own record
    run_cli("gan-train", [*grid, "trainer.overwrite=true"], tmp_path)  # the whole old job moves aside
    (moved,) = (tmp_path / "0" / "replaced").iterdir()
    assert (moved / ".hydra" / "overrides.yaml").read_bytes() == hydra_record and (moved / "train.log").is_file()
    assert (moved / "checkpoints" / "last.pt").is_file()


def test_a_terminal_sees_a_note_while_torch_imports_and_a_pipe_does_not(capfd):
    """Seconds pass before a command can say anything; at a terminal a note fills them, then erases itself."""
    entry_points._note_while_starting("gan-sample")()  # stderr is pytest's capture file here, as a pipe would be
    assert capfd.readouterr().err == ""  # so an error into a pipe or a log stays one line
    terminal, screen = pty.openpty()
    saved = os.dup(2)
    os.dup2(screen, 2)
    try:
        erase = entry_points._note_while_starting("gan-sample")
        erase()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(screen)
    shown, deadline = b"", time.monotonic() + 10
    while not shown.endswith(b"\x1b[K") and time.monotonic() < deadline:  # a pty may deliver it in pieces
        if select.select([terminal], [], [], 0.1)[0]:
            shown += os.read(terminal, 1000)
    os.close(terminal)
    # The note, then back to the line's start and cleared: the command's first line starts on a clean line.
    assert shown.startswith(b"gan-sample: starting (importing PyTorch)...\r") and shown.endswith(b"\r\x1b[K")


@pytest.mark.parametrize("delay_s", [0.3, 2.0])
def test_ctrl_c_while_starting_is_one_line_and_writes_nothing(delay_s: float, tmp_path: Path):
    command = start([*FAST, "trainer.max_steps=100000", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, program="")
    time.sleep(delay_s)  # importing torch, composing, loading data: before the first step
    os.killpg(command.pid, signal.SIGINT)
    _, err = command.communicate(timeout=300)
    assert command.returncode == 130 and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sighup_stops_training_with_a_checkpoint(tmp_path: Path):
    run = tmp_path / "run"
    command = start([*FAST, "trainer.max_steps=100000", "trainer.log_every=2", f"hydra.run.dir={run}"], tmp_path)
    wait_for(lambda: training(run))
    os.killpg(command.pid, signal.SIGHUP)  # the terminal or the SLURM session closed
    _, err = command.communicate(timeout=300)
    assert command.returncode == 128 + signal.SIGHUP and "Traceback" not in err, err
    assert card(run)["status"] == "interrupted" and (run / "checkpoints" / "last.pt").is_file()


def test_a_second_signal_means_now_but_the_same_signal_twice_does_not():
    stop = train.StopRequest(check_every=1, device=torch.device("cpu"))
    try:
        stop._handle(signal.SIGINT, None)
        stop._handle(signal.SIGINT, None)  # the terminal's and the sweep's copy of one Ctrl-C
        assert stop.signal == signal.SIGINT
        stop._first_s -= errors.SAME_SIGNAL_S
        with pytest.raises(errors.Interrupted):
            stop._handle(signal.SIGINT, None)
    finally:
        stop.restore()


def test_a_second_signal_while_the_run_closes_leaves_its_card_interrupted(tmp_path: Path, monkeypatch):
    """Real signals to this process, through train()'s own handler: the first stops, the second means now."""
    monkeypatch.setattr(train, "SAME_SIGNAL_S", 0.0)  # no repeat is taken as the same Ctrl-C delivered twice
    drawn = report.write_report

    def ctrl_c_twice_while_drawing(run_dir: Path) -> list:
        os.kill(os.getpid(), signal.SIGINT)  # the first: stop after this step (the loop has ended already)
        os.kill(os.getpid(), signal.SIGINT)  # the second, while the figures are drawn: Interrupted
        return drawn(run_dir)

    monkeypatch.setattr(report, "write_report", ctrl_c_twice_while_drawing)
    with pytest.raises(errors.Interrupted):
        supervise.supervise(train.train, compose("train", [*FAST, "trainer.max_steps=2"]), tmp_path)
    assert card(tmp_path)["status"] == "interrupted" and card(tmp_path)["signal"] == signal.SIGINT
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["step"] == 2


# ---------------------------------------------------------------- schedules over slots


def test_learning_rate_decay_follows_the_run_not_the_slot():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=1.0)
    optimizer.param_groups[0]["base_lr"] = 1.0
    clock = schedule.Schedule(100, 1.0, 0, 0.5, [optimizer], torch.device("cpu"))
    clock.elapsed_s = 59.0  # this slot is almost over, the run is not
    clock.set_learning_rates(10)
    assert optimizer.param_groups[0]["lr"] == 1.0
    clock.set_learning_rates(75)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)


def test_a_run_cut_into_slots_decays_as_the_run_in_one_piece(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    settings = [*FAST, "trainer.max_steps=12", "trainer.log_every=4", "trainer.lr_decay=0.5", "trainer.ckpt_every=100"]
    whole = train.train(compose("train", settings), tmp_path / "whole")
    caplog.set_level(logging.INFO, logger="dcgan.train")
    for _ in range(3):  # three slots of one log row each: trainer.max_minutes runs out at the first clock reading
        train.train(compose("train", [*settings, "trainer.max_minutes=1e-6", "trainer.resume=auto"]), tmp_path / "cut")
    # The slot's last line says how to continue in this folder: the default folder is new on every run.
    assert f"plus trainer.resume=auto hydra.run.dir={tmp_path / 'cut'}" in caplog.text
    rows = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("whole", "cut")
    ]
    assert [(r["step"], r["lr_g"]) for r in rows[1]] == [(r["step"], r["lr_g"]) for r in rows[0]]
    assert whole["step"] == rows[1][-1]["step"] == 12


def test_a_resume_that_has_nothing_left_to_train_says_so(caplog: pytest.LogCaptureFixture):
    """A branch from the 1,000-step quick start with the default trainer.epochs=5 ends where it starts."""
    epochs = train.TrainerConfig(max_steps=0, epochs=5)
    with caplog.at_level(logging.WARNING, logger="dcgan.train"):
        train.warn_if_nothing_to_train(epochs, 0, 195)  # a fresh run
        train.warn_if_nothing_to_train(epochs, 100, 195)  # a resume with steps left
        assert not caplog.records
        train.warn_if_nothing_to_train(epochs, 1000, 1000)
        train.warn_if_nothing_to_train(train.TrainerConfig(max_steps=800), 1000, 800)
    first, second = [record.getMessage() for record in caplog.records]
    assert first.startswith("nothing to train: the checkpoint is at step 1000, where this run ends (trainer.epochs=5")
    assert "(trainer.max_steps=800)" in second and second.endswith("set trainer.max_steps above 1000 to train on")


def test_epochs_are_trained_as_asked_after_a_resume_with_another_batch_size(tmp_path: Path):
    settings = [*FAST, "trainer.max_steps=0", "trainer.epochs=2", "dataset.max_images=160", "trainer.log_every=5"]
    train.train(compose("train", [*settings, "trainer.max_minutes=1e-6"]), tmp_path)  # stops at step 5 of 20
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["data"] == {
        "epoch": 0,
        "position": 5,
        "batch_size": 16,
    }
    train.train(compose("train", [*settings, "trainer.batch_size=32", "trainer.resume=auto"]), tmp_path)
    saved = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert saved["data"]["epoch"] == 2 and saved["data"]["position"] == 0  # two epochs, not more, not fewer
    assert saved["step"] == 5 + (2 * 5 - 80 // 32)  # 80 of 160 images seen, then batches of 32


def test_epochs_are_trained_as_asked_after_a_resume_with_another_d_steps(tmp_path: Path):
    settings = [*FAST, "trainer.max_steps=0", "trainer.epochs=2", "dataset.max_images=160", "trainer.log_every=5"]
    train.train(compose("train", [*settings, "trainer.max_minutes=1e-6"]), tmp_path)  # stops at step 5 of 20
    train.train(compose("train", [*settings, "trainer.d_steps=2", "trainer.resume=auto"]), tmp_path)
    saved = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    # 15 batches were left, two per step: 8 steps, the last one reading the first batch of a third pass
    assert saved["step"] == 5 + 8 and (saved["data"]["epoch"], saved["data"]["position"]) == (2, 1)
