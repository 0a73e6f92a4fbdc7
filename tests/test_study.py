"""Comparing configurations: every study composes, job by job; one runs for real through the joblib launcher with
Inception stood in for, and gan-report renders its folder; quality along the run on the training clock; the
sweep page of failed jobs; the fp16 copy of the weights; and every command of docs/sweeps.md is run here."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from dcgan import cli, sweep, sweep_report
from dcgan.config import UserError, compose, config_dir, validate_train
from dcgan.schedule import Schedule
from dcgan.train import TrainerConfig, evaluation_due, planned_steps

from conftest import REPO, run_cli

STUDIES = sorted(p.stem for p in (config_dir() / "study").glob("*.yaml"))
STAND_IN = Path(__file__).resolve().parent / "fixtures" / "inception_stand_in"
SWEEPS_PAGE = REPO / "docs" / "sweeps.md"
# The study run shrunk for two shared CPU cores: tiny networks, seconds of training, 20-image evaluations.
SHRINK = [
    "recipe=baseline,lr_decay",
    "hydra.launcher.n_jobs=2",
    "dataset=mnist_tiny",
    "eval.split=null",  # mnist_tiny has no test split: its own images are the reference
    "trainer.device=cpu",
    "trainer.batch_size=16",
    "generator.width=0.25",
    "discriminator.width=0.25",
    "trainer.log_every=2",
    "trainer.max_minutes=0.08",
    "trainer.eval_every_minutes=0.03",
    "eval.n=20",
    "eval.reference_n=20",
]


def doc_commands() -> List[str]:
    """The commands of docs/sweeps.md's bash blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", SWEEPS_PAGE.read_text(), re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [" ".join(line.split("#")[0].split()) for line in text.splitlines() if line.split("#")[0].strip()]


def report_commands() -> List[List[str]]:
    """The page's gan-report commands (and the GPU procedure's `report_main()` one) as gan-report's arguments."""
    commands = []
    for command in doc_commands():
        words = shlex.split(command)
        if command.startswith("gan-report"):
            commands.append(words[1:])
        elif "report_main()" in command:
            commands.append(words[words.index("from dcgan.cli import report_main; report_main()") + 1 :])
    return commands


def doc_command(start: str) -> List[str]:
    """The page's one command that starts with `start`, as arguments."""
    found = [c for c in doc_commands() if c.startswith(start)]
    assert len(found) == 1, (start, found)
    return shlex.split(found[0])


def sweeper_params(study: str) -> Dict[str, str]:
    """The study's hydra.sweeper.params as Hydra composes them (a study may take them from another)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            composed = hydra_compose("train", overrides=[f"+study={study}"], return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    assert composed.hydra.sweep.dir == f"multirun/{study}"  # each study has a folder of its own
    return {str(k): str(v) for k, v in composed.hydra.sweeper.params.items()}


def jobs_of(overrides: List[str]) -> List[List[str]]:
    """The jobs of a basic-sweeper grid: the study's sweeper params, with the command line's own sweeps winning for
    the same key, as Hydra combines them."""
    params: Dict[str, str] = {}
    for arg in overrides:
        if arg.startswith("+study="):
            params.update(sweeper_params(arg.split("=", 1)[1]))
    fixed = []
    for arg in overrides:
        key, _, value = arg.partition("=")
        if "," in value and "[" not in value and not key.startswith("hydra"):
            params[key] = value
        else:
            fixed.append(arg)
    grid = [[f"{key}={v.strip()}" for v in values.split(",")] for key, values in params.items()]
    return [fixed + list(combination) for combination in itertools.product(*grid)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "stand-in.pth"  # never read: Inception is stood in for
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("study", STUDIES)
def test_every_job_of_every_study_composes_and_passes_the_checks(study: str, weights: Path):
    jobs = jobs_of([f"+study={study}", f"eval.inception_weights={weights}"])
    expected = {
        "presets_28px": 12,
        "presets_native": 3,
        "ema": 4,
        "gpu_recipes": 6,
        "gpu_recipes_64px": 6,
        "conditional": 4,
    }
    assert len(jobs) == expected[study]
    configs = [compose("train", job) for job in jobs]
    for cfg in configs:
        validate_train(cfg)
        assert cfg.dataset.name == "fashion_mnist" and cfg.dataset.channels == 1
    assert len({json.dumps(dict(cfg), default=str, sort_keys=True) for cfg in configs}) == len(jobs)  # all differ
    if study.startswith("presets"):  # a budget of images: the rows' batch sizes differ, their images seen do not
        assert {cfg.trainer.max_images for cfg in configs} == {64000} and not any(c.trainer.max_steps for c in configs)
        assert len({cfg.trainer.batch_size for cfg in configs}) > 1
    if study.startswith("gpu"):  # a budget of minutes, scored along it against the test split
        assert all(c.trainer.max_minutes == 5 and c.trainer.eval_every_minutes == 1 for c in configs)
        assert all(c.eval.split == "test" and c.eval.n == 10000 for c in configs)
        assert {c.dataset.image_size for c in configs} == {64 if study.endswith("64px") else 28}
    if study == "conditional":  # like for like: one seed, one budget of images, the same networks; one row without
        assert {(c.trainer.max_images, c.trainer.seed, c.generator.width, c.trainer.batch_size) for c in configs} == {
            (128000, 0, 1.0, 128)
        }
        ways = {(c.generator.condition, c.discriminator.condition) for c in configs if c.conditional}
        assert ways == {("batchnorm", "projection"), ("embed", "projection"), ("embed", "embed")}
        assert sum(not c.conditional for c in configs) == 1 and all(c.eval.split == "test" for c in configs)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory, weights: Path) -> Path:
    """docs/sweeps.md's gpu_recipes command through the joblib launcher, shrunk, with Inception stood in for in the
    job processes (tests/fixtures/inception_stand_in)."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install '.[sweep]'")
    root = tmp_path_factory.mktemp("study")
    command = doc_command("gan-train -m +study=gpu_recipes hydra/launcher=joblib")
    args = [a for a in command[1:] if not a.startswith(("dataset.root=", "eval.inception_weights="))]
    args += [*SHRINK, f"eval.inception_weights={weights}", f"hydra.sweep.dir={root / 'sweep'}"]
    with pytest.MonkeyPatch.context() as patch:  # run_cli passes os.environ on to gan-train and its workers
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(STAND_IN), os.environ.get("PYTHONPATH")])))
        run_cli("gan-train", args, root)
    return root / "sweep"


def test_a_study_runs_through_joblib_with_evaluations_on_the_training_clock(study_dir: Path):
    for job in ("0", "1"):
        folder = study_dir / job
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        scored = [row for row in rows if "fid" in row]
        # Timed evaluations plus the last step's, where trainer.max_minutes of training ended the run.
        assert len(scored) >= 2 and scored[-1]["step"] == rows[-1]["step"] and scored[-1]["minutes"] >= 0.08
        assert all(a["minutes"] < b["minutes"] for a, b in zip(scored, scored[1:], strict=False))
        assert json.loads((folder / "run_card.json").read_text())["status"] == "time limit"
        for row in scored:  # each evaluation: a checkpoint, and gan-eval's stamp beside it with the row's score
            step = f"step_{row['step']:06d}"
            stamp = json.loads((folder / "checkpoints" / f"{step}.eval.json").read_text())["results"][0]
            assert (folder / "checkpoints" / f"{step}.pt").is_file()
            assert stamp["generated"]["step"] == row["step"] and round(stamp["value"], 6) == row["fid"]
            assert stamp["generated"]["count"] == 20 and stamp["reference"]["count"] == 20
        record = json.loads((study_dir / "sweep_jobs" / f"{job}.json").read_text())
        assert record["status"] == "completed" and record["objective"] == "none"


def test_gan_report_renders_the_study_best_first_with_its_plot(study_dir: Path, tmp_path: Path):
    for command in report_commands():  # the page's own, pointed at this sweep (and out= at tmp_path)
        args = [a for a in command if not a.startswith(("sweep=", "out="))]
        out = [f"out={tmp_path / 'docs' / 'RESULTS_gpu.md'}"] if any(a.startswith("out=") for a in command) else []
        cli.report_main([f"sweep={study_dir}", *out, *args])
    page = (study_dir / sweep_report.PAGE).read_text()
    assert (study_dir / sweep_report.PLOT).is_file()
    assert (tmp_path / "docs" / "results" / "RESULTS_gpu_fid.png").is_file()
    assert (tmp_path / "docs" / "RESULTS_gpu.md").read_text().startswith("# Training recipes on one GPU at 28 px")
    rows = [line.split(" | ") for line in page.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert [r[2] for r in rows] != [] and {r[2] for r in rows} == {"`recipe=baseline`", "`recipe=lr_decay`"}
    last_fids = [float(r[4].split()[-1]) for r in rows]
    assert last_fids == sorted(last_fids)  # best first, by the last FID along each run (sweep.objective=none)
    for row in rows:  # the objective is the run's last evaluation
        job = row[1].strip("`")
        last = [json.loads(line) for line in (study_dir / job / "metrics.jsonl").read_text().splitlines()][-1]
        assert float(row[4].split()[-1]) == pytest.approx(last["fid"], rel=1e-3) and row[3] == "completed"
    assert "`gan-train -m +study=gpu_recipes hydra/launcher=joblib" in page and "**Device:** cpu" in page


def test_a_sweep_page_lists_failed_jobs_last_with_why(tmp_path: Path):
    """A user's grid of three jobs as gan-train -m leaves it: one scored, one failed on a bad value, one diverged."""
    assert sweep_report.JOB_RECORDS == sweep.JOBS
    jobs = {
        "0": {"status": "failed", "error": "trainer.batch_size must be >= 1, got -1", "batch": "-1"},
        "1": {"status": "completed", "objective": "loss_g", "value": 0.75, "batch": "16"},
        "2": {"status": "diverged", "error": "NaN in D's loss at step 3", "objective": "loss_g", "batch": "32"},
    }
    for name, job in jobs.items():
        folder = tmp_path / name
        (folder / ".hydra").mkdir(parents=True)
        overrides = [f"trainer.batch_size={job.pop('batch')}", "loss=hinge"]
        record = {"job": name, "folder": str(folder), "overrides": overrides, "ended": time.time(), **job}
        (tmp_path / "sweep_jobs").mkdir(exist_ok=True)
        (tmp_path / "sweep_jobs" / f"{name}.json").write_text(json.dumps(record))
    # Two invocations (continued with trainer.resume=auto): each counts its own minutes from 0.
    rows = [{"step": 2, "minutes": 0.06}, {"step": 3, "minutes": 0.02}, {"step": 4, "d_accuracy": 0.5, "minutes": 0.04}]
    (tmp_path / "1" / "metrics.jsonl").write_text("".join(json.dumps({**row, "epoch": 0}) + "\n" for row in rows))
    (tmp_path / "1" / "checkpoints").mkdir()
    intra = {"metric": "intra_class_fid", "mean": 215.1, "worst": {"label": 9, "class": "Ankle boot", "value": 250.6}}
    (tmp_path / "1" / "checkpoints" / "last.eval.json").write_text(json.dumps({"results": [intra]}))
    (tmp_path / "1" / ".hydra" / "config.yaml").write_text("trainer:\n  batch_size: 16\n  d_steps: 2\n")
    page = sweep_report.write_page(tmp_path)[0].read_text()
    rows = [line for line in page.splitlines() if re.match(r"\| \d ", line)]
    assert rows[0].startswith(
        "| 1 | `1` | `trainer.batch_size=16` | completed | loss_g 0.75 | - | 128 | 0.10 | 0.50 "
        "| 215.10 (Ankle boot 250.60)"  # 0.10 min: 0.06 in the first invocation, 0.04 in the second
    )
    assert "| failed |" in rows[1] and rows[1].endswith("trainer.batch_size must be >= 1, got -1 |")
    assert "| diverged |" in rows[2] and "NaN in D's loss at step 3" in rows[2]
    assert "**Jobs:** 3: 1 completed, 1 failed, 1 diverged" in page


def test_gan_report_refuses_what_is_not_a_sweep(tmp_path: Path, capsys):
    for args, message in (
        ([f"sweep={tmp_path}"], "holds no job folders"),
        ([f"sweep={tmp_path / 'nope'}"], "is not a folder"),
        ([f"sweep={tmp_path}", f"run={tmp_path}"], "not both"),
        ([f"sweep={tmp_path}", "out=page.html"], "ending in .md"),
    ):
        with pytest.raises(SystemExit) as exit:
            cli.report_main(args)
        error = capsys.readouterr().err
        assert exit.value.code == 2 and message in error and len(error.strip().splitlines()) == 1


def test_evaluations_are_due_by_steps_minutes_and_at_the_end_and_their_time_is_not_training():
    schedule = Schedule(100, 1.0, 0, 0, [], torch.device("cpu"), eval_every_minutes=0.5)
    schedule.started -= 45  # 45 s have passed, 40 of them evaluating
    schedule.leave_out(40)
    assert schedule.read_clock() == (False, False, False) and schedule.minutes == pytest.approx(5 / 60, abs=1e-3)
    schedule.started -= 30  # 35 s of training: an evaluation is due, the next at 60 s
    assert schedule.read_clock() == (False, False, True) and schedule.next_eval_s == 60
    trainer = TrainerConfig(eval_every=10)
    assert [s for s in range(1, 26) if evaluation_due(trainer, s, 25, False, False)] == [10, 20, 25]
    timed = TrainerConfig(eval_every_minutes=1)
    assert evaluation_due(timed, 7, 25, True, False) and evaluation_due(timed, 7, 25, False, True)
    assert not evaluation_due(timed, 7, 25, False, False) and not evaluation_due(TrainerConfig(), 25, 25, True, True)


def test_an_image_budget_is_equal_for_any_batch_size_and_excludes_a_step_budget():
    assert planned_steps(TrainerConfig(max_images=64000, batch_size=32), None) == 2000
    assert planned_steps(TrainerConfig(max_images=64000, batch_size=128), None) == 500
    assert planned_steps(TrainerConfig(max_images=1000, batch_size=128, d_steps=2), None) == 4  # rounded up
    with pytest.raises(UserError, match="both set the run's length"):
        validate_train(compose("train", ["trainer.max_images=100", "trainer.max_steps=5"]))
    with pytest.raises(UserError, match="dataset mnist_tiny has no such split"):
        validate_train(compose("train", ["trainer.eval_every=5", "eval.split=test"]))


def test_gan_eval_stages_an_fp16_copy_of_the_weights(tmp_path: Path, capsys):
    fp32 = tmp_path / "fp32.pth"
    torch.save({"conv.weight": torch.randn(8, 3), "bn.num_batches_tracked": torch.tensor(7)}, fp32)
    words = doc_command("gan-eval fp16_copy=")
    out = tmp_path / "data" / "weights" / "inception-fp16.pth"
    args = [f"fp16_copy={out}" if a.startswith("fp16_copy=") else f"inception_weights={fp32}" for a in words[1:]]
    result = run_cli("gan-eval", args, tmp_path)
    assert f"wrote {out}" in result.stdout
    half, full = torch.load(out, weights_only=True), torch.load(fp32, weights_only=True)
    assert half["conv.weight"].dtype == torch.float16 and torch.equal(half["bn.num_batches_tracked"], torch.tensor(7))
    assert torch.allclose(half["conv.weight"].float(), full["conv.weight"], atol=1e-2)
    with pytest.raises(SystemExit) as exit:
        cli.eval_main([f"fp16_copy={out}", f"inception_weights={tmp_path / 'none.pth'}"])
    assert exit.value.code == 2 and "fp16_copy needs the fp32 weights" in capsys.readouterr().err


def test_every_command_of_the_sweeps_page_is_run_by_these_tests(weights: Path):
    """The study and report commands run above, shrunk; the fp16 copy too; every other gan-train -m command's jobs
    (python -m dcgan is gan-train) each compose and pass gan-train's checks, the first two of each."""
    ran_above = ("gan-train -m +study=gpu_recipes hydra/launcher=joblib", "gan-report", "gan-eval fp16_copy=")
    assert len(report_commands()) == 3
    sweeps = [c for c in doc_commands() if "gan-train -m" in c or "-m dcgan -m" in c]
    others = [c for c in sweeps if not c.startswith(ran_above)]
    assert len(others) >= 5, others
    for command in others:
        words = shlex.split(command)
        args = words[len(words) - words[::-1].index("-m") :]  # after the last -m: the sweep's overrides
        args = [a for a in args if not a.startswith(("hydra", "dataset.root=", "eval.inception_weights="))]
        for job in jobs_of([*args, f"eval.inception_weights={weights}"])[:2]:
            if any(a.startswith("hparams_search=") for a in job):
                pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install '.[sweep]'")
            validate_train(compose("train", job))
