"""scripts/gpu_check.py runs end to end in its CPU smoke mode, so the one GPU command can't rot between GPU runs.

No figure is asserted (CPU, tiny sizes); the report's parts and their shape are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_gpu_check_writes_its_json_and_table_in_smoke_mode(tmp_path: Path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["smoke"] and report["tests"]["exit_code"] in (0, 5) and report["tests"]["failures"] == 0
    assert report["tests"]["tests"] >= 6  # the CUDA-only tests were collected (and skipped here)
    variant = report["variants"][0]
    assert variant["ok"] and variant["noise_stream_equal"] and variant["max_weight_difference"] == 0.0
    assert [row["overrides"] for row in report["bench"]] == [["trainer.amp=bf16"]]
    assert all(row["images_per_s"] > 0 for row in report["bench"])
    table = (tmp_path / "gpu_check.md").read_text()
    assert "smoke mode" in table and "| defaults (fp32) |" in table and "trainer.amp=bf16" in table
