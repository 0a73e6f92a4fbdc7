"""scripts/bench.py runs end to end on CPU at a small size: both loops train, the report has every number.

No timing is asserted (CI machines are shared); the FLOP counts are, since they are arithmetic.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


def test_bench_compares_the_reference_loop_with_ours_on_cpu(tmp_path: Path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(SCRIPT),
        "--device",
        "cpu",
        "--data",
        "synthetic",
        "--max-images",
        "256",
        "--image-size",
        "16",
        "--batch-size",
        "16",
        "--steps",
        "3",
        "--warmup",
        "2",
        "--workers",
        "1",
        "--threads",
        "1",
        "--repeat",
        "2",
        "--ours",
        "",
        "--ours",
        "trainer.channels_last=true trainer.fused_optimizer=false",
        "--json",
        str(out),
    ]
    result = subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads(out.read_text())
    assert report["device"].startswith("CPU") and report["torch"] == __import__("torch").__version__
    assert (
        report["batch_size"] == 16
        and report["timed_steps"] == 3
        and report["warmup_steps"] == 2
        and report["repeats"] == 2
    )
    names = [r["name"] for r in report["results"]]
    assert names == [
        "reference (pytorch/examples loop)",
        "ours (defaults)",
        "ours trainer.channels_last=true trainer.fused_optimizer=false",
    ]
    for r in report["results"]:
        assert len(r["images_per_s_runs"]) == 2 and all(math.isfinite(v) and v > 0 for v in r["images_per_s_runs"])
        assert min(r["images_per_s_runs"]) <= r["images_per_s"] <= max(r["images_per_s_runs"])
        assert math.isclose(r["tflop_per_s"], r["images_per_s"] * r["flops_per_image"] / 1e12)
    reference, ours = report["results"][0], report["results"][1]
    assert reference["ratio_to_reference"] == 1.0
    assert math.isclose(ours["ratio_to_reference"], ours["images_per_s"] / reference["images_per_s"])
    # The same networks: the steps differ only in the reference's extra D weight gradients in G's
    # update and our second G forward, so the FLOP counts agree within a few percent.
    assert ours["flops_per_image"] > 0 and abs(ours["flops_per_image"] / reference["flops_per_image"] - 1) < 0.05

    table = result.stdout
    assert "images/s" in table and "x ref" in table and "GFLOP/image" in table and "TFLOP/s" in table
    assert all(name in table for name in names)


def test_bench_reports_a_bad_override_in_one_line(tmp_path: Path):
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--no-reference", "--ours", "trainer.warp_speed=true"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("bench.py: error: unknown config key trainer.warp_speed")
