"""The configs ship inside the wheel: a plain install and a source (editable) checkout both find them."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def python(args: list, cwd: Path, pythonpath: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        pytest.skip(
            f"could not build the wheel here (is the package index reachable for hatchling?): {result.stderr[-300:]}"
        )
    return next(out.glob("dcgan-*.whl"))


def test_wheel_contains_every_config(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in (REPO / "configs").rglob("*.yaml"):
        assert f"dcgan/configs/{path.relative_to(REPO / 'configs')}" in names, path
    assert "dcgan/assets/mnist_tiny.npz" in names


def test_plain_install_trains_from_any_directory(wheel: Path, tmp_path: Path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = python(["-c", "from dcgan.config import config_dir; print(config_dir())"], elsewhere, target)
    assert found.stdout.strip() == str(target / "dcgan" / "configs"), found.stderr
    run = python(
        [
            "-m",
            "dcgan",
            "trainer.max_steps=2",
            "trainer.batch_size=8",
            "trainer.progress=false",
            "trainer.device=cpu",
            "hydra.run.dir=run",
        ],
        elsewhere,
        target,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (elsewhere / "run" / "checkpoints" / "last.pt").is_file()


def test_source_checkout_uses_top_level_configs(tmp_path: Path):
    found = python(["-c", "from dcgan.config import config_dir; print(config_dir())"], tmp_path, REPO / "src")
    assert found.stdout.strip() == str(REPO / "configs"), found.stderr
