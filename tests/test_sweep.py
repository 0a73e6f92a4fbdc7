"""Sweeps through the real gan-train: objectives returned to the sweeper, a bad job that fails alone, Optuna
searches that continue, submitit jobs of several DDP tasks, the joblib launcher, tab completion."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from dcgan import checkpoint, supervise, sweep
from dcgan.config import compose

from conftest import BIN, WEIGHTS, needs_weights, run_cli

TINY = [
    "trainer.device=cpu",
    "trainer.progress=false",
    "trainer.batch_size=16",
    "trainer.log_every=2",
    "generator.width=0.25",
    "discriminator.width=0.25",
    "dataset.max_images=256",
]


def summary(sweep_dir: Path) -> Dict[str, Dict[str, Any]]:
    """The sweep's job records by job number."""
    return {r["job"]: r for r in json.loads((sweep_dir / "sweep_summary.json").read_text())}


def test_a_bad_job_fails_alone_and_the_summary_says_why(tmp_path: Path):
    # The joblib launcher runs both jobs at once, in other processes.
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install '.[sweep]'")
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "trainer.batch_size=-1,16", *TINY[:2], *TINY[3:]]
    result = run_cli(
        "gan-train",
        [*args, "trainer.max_steps=4", "sweep.objective=loss_g", f"hydra.sweep.dir={tmp_path}"],
        tmp_path,
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("gan-train:")]
    assert errors[0] == "gan-train: job 0: trainer.batch_size must be >= 1, got -1"
    assert "sweep of 2 jobs: 1 completed, 1 failed" in errors[-1]
    jobs = summary(tmp_path)
    assert jobs["0"]["status"] == "failed" and "trainer.batch_size=-1" in jobs["0"]["overrides"]
    good = jobs["1"]
    assert good["status"] == "completed" and good["objective"] == "loss_g" and math.isfinite(good["value"])
    rows = [json.loads(line) for line in (tmp_path / "1" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1] == {"step": 4, "epoch": rows[-2]["epoch"], "sweep_objective": "loss_g", "loss_g": good["value"]}
    assert rows[-2]["loss_g"] == good["value"]  # the mean of the last log interval
    card = json.loads((tmp_path / "1" / "run_card.json").read_text())
    assert card["objective"]["value"] == good["value"] and "last 2 steps" in card["objective"]["protocol"]
    markdown = (tmp_path / "sweep_summary.md").read_text()
    assert "| 1 | completed | loss_g |" in markdown and "trainer.batch_size must be >= 1, got -1" in markdown


def test_a_value_of_the_wrong_type_stops_the_sweep_before_any_job(tmp_path: Path):
    result = run_cli(
        "gan-train", ["-m", "trainer.batch_size=16,abc", f"hydra.sweep.dir={tmp_path / 's'}"], tmp_path, check=False
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "sweep job trainer.batch_size=abc can't be composed" in result.stderr and not (tmp_path / "s").exists()


def test_a_diverged_or_failed_job_returns_the_worst_score(tmp_path: Path, monkeypatch):
    cfg = compose("train", [*TINY, "trainer.max_steps=2", "sweep.objective=loss_g"])

    def diverges(*args, **kwargs):
        raise supervise.DivergedAndStopped("NaN in D's loss at step 1")

    monkeypatch.setattr(supervise, "supervise", diverges)
    assert sweep.run_job(cfg, tmp_path / "0", "0", ["x=1"], []) == math.inf
    record = json.loads((tmp_path / "sweep_jobs" / "0.json").read_text())
    assert record["status"] == "diverged" and "NaN in D's loss" in record["error"]


def test_a_stored_fid_is_reported_again_only_if_measured_the_same_way(tmp_path: Path, monkeypatch):
    """A continued sweep's finished job: its stored FID stands for the same eval.*, not for another eval.n."""
    measured = []
    monkeypatch.setattr(sweep, "final_score", lambda cfg, run, name: measured.append(cfg.eval.n) or (1.0, "again"))
    row = {"step": 4, "epoch": 0}
    first = compose("train", [*TINY, "eval.n=40"])
    _, stored = sweep.objective(first, tmp_path, row, {})
    assert sweep.objective(first, tmp_path, row, {**stored, "value": 7.0})[0] == 7.0 and measured == [40]
    more = compose("train", [*TINY, "eval.n=50"])
    assert sweep.objective(more, tmp_path, row, {**stored, "value": 7.0})[0] == 1.0 and measured == [40, 50]


@needs_weights
def test_the_default_objective_is_the_final_fid_by_gan_evals_protocol(tmp_path: Path):
    measure = ["eval.n=100", "eval.reference_n=100", "eval.metrics=[fid]", f"eval.inception_weights={WEIGHTS}"]
    run_cli("gan-train", ["-m", *TINY, "trainer.max_steps=4", *measure, f"hydra.sweep.dir={tmp_path}"], tmp_path)
    job = summary(tmp_path)["0"]
    assert job["objective"] == "fid" and math.isfinite(job["value"])
    stamp = json.loads((tmp_path / "0" / "checkpoints" / "last.eval.json").read_text())["results"][0]
    assert stamp["value"] == job["value"] and stamp["generated"]["count"] == 100 and stamp["generated"]["step"] == 4
    assert "gan-eval: 100 generated (ema, step 4) vs 100 reference images" in job["protocol"]


def test_fid_without_inception_weights_fails_the_job_before_training(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = compose("train", [*TINY, "trainer.max_steps=2"])
    assert sweep.run_job(cfg, tmp_path / "0", "0", [], []) == math.inf
    record = json.loads((tmp_path / "sweep_jobs" / "0.json").read_text())
    assert "sweep.objective=fid needs torch-fidelity's Inception weights" in record["error"]
    assert "sweep.objective=loss_g" in record["error"] and not (tmp_path / "0" / "checkpoints").exists()


def optuna_search(tmp_path: Path, trials: int) -> subprocess.CompletedProcess:
    args = [
        "-m",
        "hparams_search=fashion_optuna",
        "dataset=mnist_tiny",
        f"hydra.sweeper.n_trials={trials}",
        "trainer.epochs=1",
        "sweep.objective=loss_g",
        *TINY[:2],
        "generator.width=0.25",
        "discriminator.width=0.25",
        "dataset.max_images=512",  # two batches at the search's largest batch size
        f"hydra.sweep.dir={tmp_path}",
    ]
    return run_cli("gan-train", args, tmp_path)


def test_an_optuna_search_finds_a_best_trial_and_an_interrupted_one_continues(tmp_path: Path):
    optuna = pytest.importorskip("optuna", reason="pip install '.[sweep]'")
    optuna_search(tmp_path, 2)
    optuna_search(tmp_path, 1)  # the same command again: the study in the sweep folder goes on
    study = optuna.load_study(study_name="fashion_optuna", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    # The continued study's sampler is seeded by the trials it holds, so it does not propose trial 0 again.
    assert study.trials[2].params not in (study.trials[0].params, study.trials[1].params)
    best = json.loads(json.dumps(__import__("yaml").safe_load((tmp_path / "optimization_results.yaml").read_text())))
    assert best["best_value"] == pytest.approx(study.best_value)
    assert set(best["best_params"]) >= {"loss", "optimizer.generator.lr", "trainer.batch_size", "trainer.ema"}
    # Three job folders (each invocation numbers its jobs from 0), each a run with its objective in the run card.
    folders = sorted(p for p in tmp_path.iterdir() if (p / "run_card.json").is_file())
    values = sorted(json.loads((p / "run_card.json").read_text())["objective"]["value"] for p in folders)
    assert len(folders) == 3 and values[0] == pytest.approx(study.best_value)


def test_submitit_runs_a_sweep_of_jobs_of_two_ddp_tasks_each(tmp_path: Path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install '.[slurm]'")
    launcher = ["hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10"]
    args = ["-m", *launcher, *TINY, "trainer.max_steps=4", "trainer.seed=0,1", "sweep.objective=loss_g"]
    run_cli("gan-train", [*args, f"hydra.sweep.dir={tmp_path}"], tmp_path)
    jobs = summary(tmp_path)
    assert sorted(jobs) == ["0", "1"] and all(j["status"] == "completed" for j in jobs.values())
    for job in jobs:
        saved = checkpoint.load(tmp_path / job / "checkpoints" / "last.pt")
        # Each job ran as two DDP processes, from submitit's view of the job, whose weights agree.
        checksums = saved["replica_checksums"]
        assert saved["step"] == 4 and len(checksums) == 2 and checksums[0] == checksums[1]
    first, second = (checkpoint.load(tmp_path / j / "checkpoints" / "last.pt")["generator"] for j in ("0", "1"))
    assert any(not torch.equal(first[k], second[k]) for k in first)  # the seeds differ


@pytest.mark.parametrize("launcher, tasks", [("slurm_gpu", 1), ("slurm_ddp", 4)])
def test_the_shipped_slurm_launchers_compose(tmp_path: Path, launcher: str, tasks: int):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install '.[slurm]'")
    result = run_cli("gan-train", [f"hydra/launcher={launcher}", "--cfg", "hydra", "-p", "hydra.launcher"], tmp_path)
    assert "SlurmLauncher" in result.stdout and f"tasks_per_node: {tasks}" in result.stdout
    assert f"gpus_per_node: {tasks}" in result.stdout


def test_a_missing_sweep_plugin_says_what_to_install(monkeypatch):
    import importlib.util

    from hydra.errors import MissingConfigException

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "hydra_plugins" in name else real(name))
    # What Hydra raises when a plugin's config is missing (hparams_search/ configs choose the Optuna sweeper).
    for group, option, extra in [("hydra/sweeper", "optuna", "sweep"), ("hydra/launcher", "slurm_gpu", "slurm")]:
        error = MissingConfigException(f"In 'hydra/config': Could not find '{group}/{option}'", None)
        assert f"{group}={option} needs the Hydra plugin" in sweep.missing_plugin(error)
        assert f"pip install 'dcgan[{extra}]'" in sweep.missing_plugin(error)
    assert sweep.missing_plugin(MissingConfigException("Could not find 'hydra/launcher/nosuch'", None)) is None
    monkeypatch.undo()  # installed: the option is a misspelling, which Hydra's own message names
    error = MissingConfigException("In 'hydra/config': Could not find 'hydra/launcher/joblib'", None)
    assert sweep.missing_plugin(error) is None


def completions(line: str) -> List[str]:
    env = {**os.environ, "COMP_LINE": line, "COMP_POINT": str(len(line))}
    result = subprocess.run(
        [str(BIN / "gan-train"), "-sc", "query=bash"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_tab_completion_offers_the_data_sets_and_hydra_help_says_how_to_install_it(tmp_path: Path):
    offered = completions("gan-train dataset=")
    assert {f"dataset={name}" for name in ("mnist", "fashion_mnist", "celeba", "folder")} <= set(offered)
    assert completions("gan-train recipe=tt") == ["recipe=ttur"]
    help_text = run_cli("gan-train", ["--hydra-help"], tmp_path).stdout
    assert 'eval "$(gan-train -sc install=bash)"' in help_text and "gan-train -sc install=fish | source" in help_text
    assert "bashcompinit" in help_text  # zsh, through its bash compatibility
