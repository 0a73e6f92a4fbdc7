"""scripts/quality.py --gpu, the GPU study, on the CPU: a tiny run end to end (trains several recipes at once,
evaluates their checkpoints with gan-eval's code, writes the report), its refusals, and its pure parts.

The end-to-end test needs the offline Inception weights (DCGAN_INCEPTION_WEIGHTS or ../shared/models/); the
rest runs without them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, WEIGHTS, needs_weights

sys.path.insert(0, str(REPO / "scripts"))
import quality_gpu  # noqa: E402

SCRIPT = REPO / "scripts" / "quality.py"
TINY = ["--device", "cpu", "--dataset", "mnist_tiny", "--size", "28", "--minutes", "0.15", "--eval-at", "0.05,0.15"]
SMALL_NETWORKS = ["trainer.batch_size=16", "generator.width=0.25", "discriminator.width=0.25", "trainer.log_every=2"]


def run_study(tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    command = [sys.executable, str(SCRIPT), "--gpu", *options, "--work", str(tmp_path / "work")]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)


@needs_weights
def test_gpu_mode_on_the_cpu_trains_at_once_evaluates_and_reports_only_stamped_numbers(tmp_path: Path):
    # The study uses an fp16 copy of the weights, as the GPU machine does (its shift against fp32: next test).
    fp16 = tmp_path / "inception-fp16.pth"
    made = run_study(tmp_path, "--inception-weights", str(WEIGHTS), "--make-fp16-weights", str(fp16))
    assert made.returncode == 0 and fp16.stat().st_size < 64 * 2**20, made.stderr[-2000:]

    # ttur's run diverges at once (a learning rate of 1e30): it is reported, and the other two are still evaluated.
    result = run_study(
        tmp_path,
        *TINY,
        "--recipes", "baseline,lr_decay,ttur",
        "--eval-n", "20",
        "--reference-n", "20",
        "--eval-workers", "2",  # the threaded path the GPU takes
        "--inception-weights", str(fp16),
        "--fp32-weights", "",  # the shift's extra evaluation is tested below, with gan-eval stubbed
        "--extra", *SMALL_NETWORKS,
        "--recipe-extra", "ttur:optimizer.discriminator.lr=1e30",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    work = tmp_path / "work"
    report = (work / "docs" / "RESULTS_gpu.md").read_text()  # --device cpu: under --work, never docs/
    assert "**CPU smoke run, not a result:**" in report
    assert "| `ttur` | diverged (exit 3) |" in report and "not reached: diverged (exit 3)" in report

    for recipe in ("baseline", "lr_decay"):
        section = report[report.index(f"## `{recipe}`: finished") :].split("\n## ")[0]
        rows = [line for line in section.splitlines() if line.startswith("| 0.")]
        assert len(rows) == 2, section
        for row in rows:  # every FID shown is the one in the stamp the row names, beside its checkpoint
            cells = [c.strip() for c in row.split("|")]
            stamp = json.loads((work / cells[9].strip("`")).read_text())["results"][0]
            assert stamp["metric"] == "fid" and cells[5] == f"{stamp['value']:.2f}", (row, stamp)
            assert stamp["generated"]["count"] == 20 and stamp["generated"]["weights"] == "ema"
            assert Path(stamp["protocol"]["weights_file"]).name == fp16.name
            assert float(cells[2]) >= float(cells[1].split()[0])  # the first checkpoint at or after the time
            # images seen = step x batch size (16) x d_steps (1)
            assert int(cells[4].replace(",", "")) == 16 * int(cells[3].replace(",", ""))
    assert "fp16, cast to fp32 when loaded; the FID shift against the fp32 weights was not measured" in report
    assert "**Best recipe:** `" in report
    assert (work / "docs" / "results" / "gpu_fid_28.png").is_file()


def test_without_inception_weights_it_refuses_before_training(tmp_path: Path):
    result = run_study(tmp_path, *TINY, "--inception-weights", str(tmp_path / "missing.pth"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no Inception weights at" in lines[0], result.stderr
    assert not (tmp_path / "work").exists()  # nothing trained


def test_an_unknown_recipe_or_a_bad_override_is_refused_before_training(tmp_path: Path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")  # never read: the study stops before
    for options in (["--recipes", "baseline,nosuch"], ["--recipes", "baseline", "--extra", "trainer.batch_size=0"]):
        result = run_study(tmp_path, *TINY, "--inception-weights", str(weights), *options)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "work").exists()


def test_gpu_mode_trains_at_once_and_reports_with_inception_stood_in_for(tmp_path: Path, monkeypatch):
    """The same run where no Inception weights are (CI): real training, checkpoint picking and report; only
    gan-eval's measurement is a stand-in, scoring each checkpoint by its step so the report's rows can be traced."""
    weights = tmp_path / "w.pth"
    torch.save({"w": torch.ones(2)}, weights)  # only its precision is read: evaluation is stood in for
    scored = []

    def stand_in(cfg):
        step = int(Path(cfg.ckpt).stem.split("_")[-1])
        scored.append(step)
        return {"fid": stamp(1000.0 / step)}

    monkeypatch.setattr(quality_gpu, "evaluate_one", stand_in)
    options = [*TINY, "--recipes", "baseline,lr_decay", "--eval-n", "20", "--inception-weights", str(weights)]
    work = tmp_path / "work"
    assert quality_gpu.main([*options, "--work", str(work), "--extra", *SMALL_NETWORKS]) == 0
    report = (work / "docs" / "RESULTS_gpu.md").read_text()
    assert "**CPU smoke run, not a result:**" in report and len(scored) == 4  # two recipes x two times
    for recipe in ("baseline", "lr_decay"):
        assert (work / recipe / "checkpoints" / "last.pt").is_file()
        section = report[report.index(f"## `{recipe}`: finished") :].split("\n## ")[0]
        rows = [[c.strip() for c in line.split("|")] for line in section.splitlines() if line.startswith("| 0.")]
        assert len(rows) == 2 and all(cells[5] == f"{1000.0 / int(cells[3].replace(',', '')):.2f}" for cells in rows)


# ---------------------------------------------------------------- the pure parts, without Inception


def test_checkpoints_fall_on_every_evaluation_time():
    assert quality_gpu.checkpoint_interval([1, 2, 3, 5]) == 1
    assert quality_gpu.checkpoint_interval([1.5, 3, 4.5]) == 1.5
    assert quality_gpu.checkpoint_interval([0.05, 0.15]) == pytest.approx(0.05)
    assert quality_gpu.parse_times("5, 1,2") == [1, 2, 5]
    with pytest.raises(quality_gpu.StudyError):
        quality_gpu.parse_times("0,1")


def test_each_time_gets_the_first_checkpointed_row_at_or_after_it():
    rows = [{"step": s, "minutes": m} for s, m in [(50, 0.4), (100, 0.98), (150, 1.01), (200, 1.5), (250, 2.02)]]
    picked = quality_gpu.pick_rows(rows, {100, 150, 250}, [1, 2, 3])
    assert picked[1]["step"] == 150  # 100 came before the minute; 200 has no checkpoint
    assert picked[2]["step"] == 250
    assert picked[3] is None  # never reached


def stamp(value: float) -> dict:
    """A gan-eval FID result with the fields the report reads."""
    return {
        "metric": "fid",
        "value": value,
        "std": None,
        "generated": {"count": 100, "weights": "ema"},
        "reference": {
            "source": "data set fashion_mnist",
            "split": "test",
            "count": 100,
            "selection": "all images",
            "image_size": 28,
        },
        "protocol": {"library": "torch-fidelity 0.4.0", "feature_extractor": "x", "weights_file": "w.pth"}
        | {"weights_sha256": "0" * 64},
    }


def test_report_from_stamps_lists_failed_runs_and_names_the_best(tmp_path: Path):
    args = quality_gpu.parse_args(
        ["--device", "cpu", "--minutes", "2", "--eval-at", "1,2", "--work", str(tmp_path), "--docs", str(tmp_path)]
    )
    args.times = [1.0, 2.0]
    runs = [
        quality_gpu.Run("baseline", tmp_path / "baseline", ["python", "-m", "dcgan"], 0, 130),
        quality_gpu.Run("ttur", tmp_path / "ttur", ["python", "-m", "dcgan"], 0, 130),
        quality_gpu.Run("sngan", tmp_path / "sngan", ["python", "-m", "dcgan"], 3, 20),
    ]
    points = {}
    for name, fids in [("baseline", [40.0, 30.0]), ("ttur", [45.0, 25.5])]:
        points[name] = []
        for i, (t, fid) in enumerate(zip([1.0, 2.0], fids, strict=True)):
            row = {"step": 100 * (i + 1), "minutes": t + 0.01, "d_accuracy": 0.7, "loss_g": 1.5}
            p = quality_gpu.Point(name, t, row, 128, tmp_path / name / f"step_{i}.pt", {"fid": stamp(fid)})
            points[name].append(p)
    kid = {**stamp(0.0123), "metric": "kid", "std": 0.0004}
    points["ttur"][0].results["kid"] = kid
    points["sngan"] = [quality_gpu.Point("sngan", t, None, 0, note="not reached: diverged (exit 3)") for t in [1, 2]]
    best = quality_gpu.best_point([p for ps in points.values() for p in ps])
    assert (best.recipe, best.fid) == ("ttur", 25.5)
    extra = {"command": "c", "date": "d", "precision": "fp32", "shift": None, "best": best, "plot": "", "plot_note": ""}
    timing = {"study": 60, "train": 40, "eval": 20}
    report = quality_gpu.write_report(args, runs, points, timing, extra, tmp_path).read_text()
    assert "| `ttur` | finished | 200 | 25,600 | 45.00 | 25.50 |" in report
    assert "| `sngan` | diverged (exit 3) | - | - | - | - |" in report
    assert "**Best recipe:** `ttur`, FID 25.50 at 2 min (25,600 images)." in report
    assert "| 2 min | 2.01 | 200 | 25,600 | 30.00 | - | 0.700 | 1.500 | `baseline/step_1.eval.json` |" in report
    assert "| 1 min | 1.01 | 100 | 12,800 | 45.00 | 12.30 ± 0.40 | 0.700 | 1.500 | `ttur/step_0.eval.json` |" in report
    assert "CPU smoke run, not a result" in report and "fp32: the exact weights" in report


def test_last_points_are_evaluated_first_and_none_runs_past_the_deadline(tmp_path: Path, monkeypatch):
    """Evaluation order, the deadline and a failing evaluation, with gan-eval replaced by a stand-in."""
    import dcgan.config

    evaluated = []

    def fake_evaluate(overrides):
        ckpt = next(o for o in overrides if o.startswith("ckpt="))
        if "bad" in ckpt:
            raise ValueError("not a checkpoint")
        evaluated.append(ckpt)
        time.sleep(0.3)
        return {"fid": stamp(10.0)}

    monkeypatch.setattr(dcgan.config, "compose", lambda name, overrides: overrides)
    monkeypatch.setattr(quality_gpu, "evaluate_one", fake_evaluate)
    args = quality_gpu.parse_args(["--device", "cpu", "--eval-workers", "1", "--work", str(tmp_path)])
    args.deadline_minutes = 0.5 / 60  # half a second: room for one evaluation of 0.3 s, not two
    row = {"step": 1, "minutes": 1.0}
    points = [
        quality_gpu.Point(name, t, row, 1, tmp_path / f"{name}-{t:g}.pt")
        for name in ("bad", "good")
        for t in (1.0, 2.0)
    ]
    quality_gpu.evaluate_points(points, args, "w.pth", time.monotonic())
    # The last time first; bad's failure costs no time, good's 0.3 s leave too little for a third.
    assert evaluated == [f"ckpt={tmp_path / 'good-2.pt'}"]
    by_name = {p.ckpt.stem: p for p in points}
    assert by_name["bad-2"].note == "evaluation failed: ValueError: not a checkpoint"
    assert by_name["bad-1"].note.startswith("not evaluated: past --deadline-minutes")
    assert by_name["good-1"].note.startswith("not evaluated: past --deadline-minutes")


def test_with_fp16_weights_the_best_point_is_measured_again_with_fp32(tmp_path: Path, monkeypatch):
    import dcgan.config

    fp32 = tmp_path / "fp32.pth"
    torch.save({"w": torch.ones(2)}, fp32)
    calls = []
    monkeypatch.setattr(dcgan.config, "compose", lambda name, overrides: overrides)
    monkeypatch.setattr(quality_gpu, "evaluate_one", lambda overrides: calls.append(overrides) or {"fid": stamp(20.5)})
    args = quality_gpu.parse_args(["--device", "cpu", "--work", str(tmp_path), "--fp32-weights", str(fp32)])
    row = {"step": 10, "minutes": 5.0}
    best = quality_gpu.Point("ttur", 5.0, row, 128, tmp_path / "step_000010.pt", {"fid": stamp(20.25)})
    shift = quality_gpu.fp16_shift(best, args, "fp16.pth", time.monotonic())
    assert f"inception_weights={fp32}" in calls[0] and f"out={tmp_path / 'step_000010.fp32.eval.json'}" in calls[0]
    line = quality_gpu.weights_line([best], "fp16", shift, best)
    assert "scores 20.2500 with them and 20.5000 with the fp32 weights" in line and ": -0.2500." in line
