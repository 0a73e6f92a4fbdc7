"""A full disk and odd file-system states are one line naming the path, exit code 2, and no temporary file.

The full disk is real: the command runs as a process whose files may not grow past a few bytes or kilobytes
(RLIMIT_FSIZE, with SIGXFSZ ignored, so a write fails with EFBIG as it would with ENOSPC on a full file
system). The odd states are made on disk (a folder or a symbolic link where the lock file goes). A run
folder owned by another user can only be made by a user who is not root, so that case runs for real
where the tests are not root and is skipped, saying so, where they are; a test beside it proves only
the message, by making os.access answer as it would for such a folder.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from PIL import Image

from dcgan import cli, metrics

from conftest import BIN, FAST, REPO, run_cli

CHECKPOINT = REPO / "tests" / "fixtures" / "checkpoint_format1.pt"  # 4 steps, 28 px


def run_with_a_full_disk(program: str, args: List[str], cwd: Path, max_bytes: int) -> subprocess.CompletedProcess:
    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [str(BIN / program), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        preexec_fn=limit_file_size,
    )


def assert_one_line(result: subprocess.CompletedProcess, program: str, expected: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"{program}: error: ") and expected in lines[0], lines


def temporary_files(folder: Path) -> List[Path]:
    return [path for path in folder.rglob(".*") if path.name.endswith(".tmp")]


# ---------------------------------------------------------------- a full disk

# Grids, seed images and GIFs share one writer (images.save_atomically), which gan-report's GIF and figure
# below also go through; an export has its own.
SAMPLE_WRITES = {
    # torch.jit.save to a path aborts the process on a full disk; gan-sample saves to memory first
    "TorchScript export": (["mode=export"], "generator.pt"),
}


@pytest.mark.parametrize("case", SAMPLE_WRITES)
def test_gan_sample_on_a_full_disk(case: str, tmp_path: Path):
    args, written = SAMPLE_WRITES[case]
    result = run_with_a_full_disk("gan-sample", [f"ckpt={CHECKPOINT}", "device=cpu", *args], tmp_path, 300)
    assert_one_line(result, "gan-sample", f"could not write {written} (File too large;")
    assert "MiB free there" in result.stderr and not list(tmp_path.iterdir())  # neither the file nor its .tmp


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    """What gan-report reads: metrics rows and two progress grids of 64 x 64 noise (PNG can't shrink them)."""
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "loss_d": 1.0, "loss_g": 2.0}}\n' for s in (1, 2)))
    noise = np.random.default_rng(0).integers(0, 256, (2, 64, 64), dtype=np.uint8)
    for step in (1, 2):
        Image.fromarray(noise[step - 1], "L").save(run / "samples" / f"step_{step:06d}.png")
    return run


def test_gan_report_on_a_full_disk(run_folder: Path):
    before = sorted(p.name for p in run_folder.rglob("*"))
    result = run_with_a_full_disk("gan-report", [f"run={run_folder}"], run_folder, 2000)
    figure = "loss_curves.png" if "loss_curves" in result.stderr else "progress.gif"  # without matplotlib: the movie
    assert_one_line(result, "gan-report", f"could not write {run_folder / figure} (File too large;")
    assert sorted(p.name for p in run_folder.rglob("*")) == before  # nothing half-written, no temporary file


def test_the_lock_record_on_a_full_disk(tmp_path: Path):
    """The lock file's record is a few dozen bytes: with room for ten, the short write is the full disk."""
    run = tmp_path / "run"
    result = run_with_a_full_disk("gan-train", [*FAST, "trainer.max_steps=2", f"hydra.run.dir={run}"], tmp_path, 10)
    assert_one_line(result, "gan-train", f"could not write {run / '.lock'} (No space left on device;")
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # no .hydra/, no log: refused before Hydra wrote


def test_hydra_record_on_a_full_disk_names_the_folder(tmp_path: Path):
    """Room for the lock's record, not for Hydra's .hydra/config.yaml, whose failed write names no file."""
    run = tmp_path / "run"
    result = run_with_a_full_disk("gan-train", [*FAST, "trainer.max_steps=2", f"hydra.run.dir={run}"], tmp_path, 300)
    assert_one_line(result, "gan-train", f"could not write a file in {run}: File too large; free some disk space")


def test_the_reference_feature_cache_on_a_full_disk(tmp_path: Path, monkeypatch, capsys):
    """torch-fidelity saves reference features with torch.save, whose failed write is a RuntimeError.

    Inception on the CPU takes a minute, so it is stood in for by a function that saves the features as
    torch-fidelity does (its own torch_atomic_save), under a real file-size limit set in this process.
    """
    import torch_fidelity.utils
    from torch_fidelity.utils_torch import torch_atomic_save

    cache = tmp_path / "cache"

    def save_features_on_a_full_disk(side, extractor, **settings):
        if side == 1:  # the generated images' features: never cached
            return {metrics.FEATURE_LAYER: torch.zeros(4, 8)}
        Path(settings["cache_root"]).mkdir(parents=True, exist_ok=True)  # as torch-fidelity does before saving
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
        try:
            torch_atomic_save(torch.zeros(10_000), str(Path(settings["cache_root"]) / settings["input2_cache_name"]))
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)

    monkeypatch.setattr(torch_fidelity.utils, "create_feature_extractor", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch_fidelity.utils, "extract_featuresdict_from_input_id_cached", save_features_on_a_full_disk)
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"stand-in")
    args = [
        f"ckpt={CHECKPOINT}",
        "device=cpu",
        "n=4",
        "reference_n=4",
        f"cache_dir={cache}",
        f"out={tmp_path / 'e.json'}",
    ]
    with pytest.raises(SystemExit) as exit:
        cli.eval_main([*args, f"inception_weights={weights}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and "Traceback" not in "".join(err), err
    # gan-eval says what it measures (the counts) before it starts; then the one error line, and nothing after.
    assert [line.startswith("gan-eval: error:") for line in err] == [False] * (len(err) - 1) + [True], err
    err = err[-1:]
    assert (
        err[0].startswith(f"gan-eval: error: could not write the reference-feature cache {cache}/")
        and "(the write was cut short;" in err[0]
        and "cache_dir=" in err[0]
    )
    assert not list(cache.iterdir()) and not (tmp_path / "e.json").exists()


# ---------------------------------------------------------------- odd file-system states


def refused_run(tmp_path: Path, expected: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.train_main([*FAST, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1 and err[0].startswith("gan-train: error: ") and expected in err[0], (
        err
    )


def test_a_lock_that_is_a_folder(tmp_path: Path, capsys):
    (tmp_path / "run" / ".lock").mkdir(parents=True)
    refused_run(tmp_path, f"{tmp_path / 'run' / '.lock'} is a folder, not gan-train's lock file; remove it", capsys)
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]


@pytest.mark.parametrize("target", ["missing/folder/lock", "elsewhere"])
def test_a_lock_that_is_a_symbolic_link_is_never_followed(target: str, tmp_path: Path, capsys):
    """Dangling or not, a link is refused: following it would lock (and write) a file outside the run."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(tmp_path / target)
    refused_run(tmp_path, f"is a symbolic link (to {tmp_path / target}), not gan-train's lock file", capsys)
    assert not (tmp_path / target).exists() and [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]


def test_a_run_folder_that_is_a_dangling_link(tmp_path: Path, capsys):
    (tmp_path / "run").symlink_to(tmp_path / "gone")
    refused_run(tmp_path, f"{tmp_path / 'run'} is a symbolic link to {tmp_path / 'gone'}, which does not exist", capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any folder: run the suite as another user for this")
def test_a_run_folder_we_may_not_write(tmp_path: Path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run").chmod(0o555)
    try:
        refused_run(tmp_path, "is not writable", capsys)
    finally:
        (tmp_path / "run").chmod(0o755)


def test_a_run_folder_we_may_not_write_is_named(tmp_path: Path, monkeypatch, capsys):
    """What the test above proves for real, here only as far as the check and its message: os.access answers
    as it does for a folder owned by another user."""
    run = tmp_path / "run"
    run.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == run else real_access(path, mode))
    refused_run(tmp_path, f"{run} is not writable; pick another hydra.run.dir", capsys)
    assert not any(run.iterdir())


def test_a_sweep_record_that_cannot_be_written_fails_the_sweep(tmp_path: Path):
    """The job runs in a joblib worker; the sweep's process learns of the lost record from the folder alone."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install '.[sweep]'")
    (tmp_path / "sweep_jobs" / "0.json").mkdir(parents=True)  # where job 0's record goes: a write there fails
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=1", "loss=ns,hinge", "sweep.objective=loss_g"]
    result = run_cli(
        "gan-train", [*args, *FAST, "trainer.max_steps=2", f"hydra.sweep.dir={tmp_path}"], tmp_path, 600, check=False
    )
    said = [line for line in result.stderr.splitlines() if line.startswith("gan-train:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert said[0].startswith(
        f"gan-train: job 0: could not write its sweep record {tmp_path / 'sweep_jobs' / '0.json'}"
    )
    assert said[-1].startswith(
        f"gan-train: error: 1 job(s) of this sweep left no record in {tmp_path / 'sweep_jobs'} (0)"
    )
    assert (tmp_path / "0" / "checkpoints" / "last.pt").is_file()  # the job's own result is kept
    assert [r["job"] for r in json.loads((tmp_path / "sweep_summary.json").read_text())] == ["1"]
