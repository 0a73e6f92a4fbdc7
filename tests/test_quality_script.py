"""scripts/quality.py end to end at a tiny budget: it trains through gan-train, measures through gan-eval,
and every FID in the report it writes is one of the JSON stamps gan-eval left beside the checkpoints.

Needs Fashion-MNIST's IDX files (Debian's dataset-fashion-mnist) and the offline
Inception weights (DCGAN_INCEPTION_WEIGHTS or ../shared/models/); skips, saying which, without them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEBIAN_FASHION_MNIST as FASHION
from conftest import REPO, WEIGHTS, needs_weights

SCRIPT = REPO / "scripts" / "quality.py"

pytestmark = [
    needs_weights,
    pytest.mark.skipif(
        not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
        reason=f"no Fashion-MNIST in {FASHION} (apt-get install dataset-fashion-mnist)",
    ),
]


def run_quality(tmp_path: Path, *options: str) -> tuple:
    """Run scripts/quality.py on Fashion-MNIST with its own work, docs and cache folders; returns (work, docs)."""
    work, docs = tmp_path / "work", tmp_path / "docs"
    command = [
        sys.executable,
        str(SCRIPT),
        *options,
        "--fashion-root",
        str(FASHION),
        "--mnist-root",
        str(tmp_path / "no-mnist"),
        "--inception-weights",
        str(WEIGHTS),
        "--work",
        str(work),
        "--docs",
        str(docs),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work, docs


def test_quality_script_reports_only_numbers_that_gan_eval_stamped(tmp_path: Path):
    work, docs = run_quality(
        tmp_path,
        "--budget-images",
        "256",
        "--only",
        "dcgan_ns",
        "--eval-n",
        "40",
        "--reference-n",
        "40",
        "--key-eval-n",
        "48",
        "--ema-seeds",
        "0",
        "--ema-budget-images",
        "512",
        "--ema-points",
        "2",
    )

    report = (docs / "RESULTS.md").read_text()
    stamps = [
        r
        for path in work.rglob("*.json")
        if "results" in (data := json.loads(path.read_text()))
        for r in data["results"]
    ]
    stamped = {f"{r['value']:.1f}" for r in stamps if r["metric"] == "fid"}
    counts = {r["generated"]["count"] for r in stamps}
    assert {40, 48} <= counts, counts  # the table's n and the key rows' n
    assert any(r["reference"]["split"] == "test" for r in stamps)  # the published protocol's reference

    # The baseline row: its FID (EMA) and its EMA-off FID are both stamped values.
    row = next(line for line in report.splitlines() if line.startswith("| `dcgan_ns` |"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[7] in stamped and cells[9] in stamped, (row, stamped)
    assert (docs / "results" / "fashion_mnist_dcgan_ns.png").is_file()

    # The longer run at the published protocol sits beside the published values, with its reference split named.
    published = report[report.index("## Published numbers beside ours") :]
    assert "| NS GAN | `ns` | 26.5 ± 1.6 |" in published
    long_row = next(line for line in published.splitlines() if line.startswith("| `ema_study_seed0` |"))
    cells = [c.strip() for c in long_row.split("|")]
    assert cells[6] == "48 / 40 test" and cells[4] in stamped, (long_row, stamped)
    assert "MNIST:** its IDX files are not on this machine" in report


def test_native_table_measures_each_preset_at_its_own_size(tmp_path: Path):
    """The presets made for 64x64 (and tf_celeba28's own networks) train and are measured at their own size."""
    work, docs = run_quality(
        tmp_path, "--table", "native", "--budget-images", "128", "--eval-n", "24", "--reference-n", "24"
    )

    report = (docs / "RESULTS_native.md").read_text()
    stamps = {path.parent.parent.name: json.loads(path.read_text())["results"] for path in work.rglob("eval-ema.json")}
    assert set(stamps) == {"dcgan64_64px", "keras_celeba64_64px", "tf_celeba28_28px"}, set(stamps)
    for name, size in [("dcgan64_64px", 64), ("keras_celeba64_64px", 64), ("tf_celeba28_28px", 28)]:
        fid = next(r for r in stamps[name] if r["metric"] == "fid")
        # Generated images and their reference at the preset's own size, never a mismatch.
        assert fid["generated"]["image_size"] == fid["reference"]["image_size"] == size, fid
        row = next(line for line in report.splitlines() if line.startswith(f"| `{name}` |"))
        cells = [c.strip() for c in row.split("|")]
        assert cells[4] == f"{size}x{size}" and cells[7] == f"{fid['value']:.1f}" and cells[9] == "24 / 24", row
        assert (docs / "results" / f"fashion_mnist_{name}.png").is_file()
    # The first row at each size computed its reference; the second 64-px row read it from the cache.
    assert stamps["keras_celeba64_64px"][0]["protocol"]["reference_features"] == "cached"
    assert "(with reference)" in next(line for line in report.splitlines() if line.startswith("| `dcgan64_64px` |"))
    # The real-data floor at 64 px, against the 64-px rows' own reference; the 28-px one is RESULTS.md's.
    floors = [json.loads(path.read_text())["results"] for path in work.glob("real-*.json")]
    assert len(floors) == 1 and floors[0][0]["reference"]["image_size"] == 64, floors
    floor_fid = next(r for r in floors[0] if r["metric"] == "fid")
    assert floor_fid["protocol"]["reference_features"] == "cached"
    row = next(line for line in report.splitlines() if line.startswith("| real data |"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[4] == "64x64" and cells[7] == f"{floor_fid['value']:.1f}", row
