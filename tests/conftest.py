"""Shared fixtures: run the installed console scripts, compose real configs, make small data sets."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, List

import numpy as np
import pytest
import torch
from PIL import Image

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
# Data and weights this machine may hold; tests that need them skip, saying why, when they are absent.
WEIGHTS = Path(
    os.environ.get("DCGAN_INCEPTION_WEIGHTS", REPO.parent / "shared" / "models" / "inception-2015-12-05-fidelity.pth")
)
needs_weights = pytest.mark.skipif(
    not WEIGHTS.is_file(),
    reason=f"no Inception weights at {WEIGHTS}: set DCGAN_INCEPTION_WEIGHTS to a torch-fidelity weights file (tests "
    "never download)",
)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_test_process():
    """Under `-n 2` two test processes share the two cores: a torch in each with a thread per core (and every
    gan-train it starts) would oversubscribe them, each waiting on threads the other has pushed off a core."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    threads, before = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the commands the tests start inherit it
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if before is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = before


@pytest.fixture(autouse=True)
def logging_as_it_was():
    """A command run in-process configures logging for its one run: Hydra's job logging binds the root logger
    to the streams of that moment, which pytest captures and closes after the test. Put the root logger back,
    so a later test's log lines don't go to a closed stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session", autouse=True)
def session_cache_home(tmp_path_factory) -> Path:
    """Caches (decoded images, reference features) go to a folder of this test session, not the user's
    ~/.cache: every test folder is a new data set, and its decoded copy would stay there for good. Tests
    that look inside a cache set $XDG_CACHE_HOME to a folder of their own."""
    home, before = tmp_path_factory.mktemp("xdg-cache"), os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(home)  # subprocesses (run_cli) inherit it
    yield home
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


def run_cli(
    program: str, args: List[str], cwd: Path, timeout: float = 900, check: bool = True
) -> subprocess.CompletedProcess:
    """Run an installed console script (gan-train, gan-sample) the way a user would.

    The timeout only catches hangs: on two cores shared with another job, the 300-step smoke run once took
    longer than 300 s.
    """
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [str(BIN / program), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{program} {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


@pytest.fixture
def one_torch_thread():
    """One CPU thread: on a shared 2-core machine two OpenMP threads wait on each other far longer than they compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Small, fast settings for CPU runs: a narrow network and frequent logging.
FAST = [
    "trainer.device=cpu",
    "trainer.progress=false",
    "trainer.batch_size=16",
    "trainer.log_every=5",
    "trainer.sample_every=10",
    "trainer.ckpt_every=10",
    "generator.width=0.25",
    "discriminator.width=0.25",
]


def make_celeba(root: Path, count: int = 24, seed: int = 0) -> Path:
    """A CelebA-style tree (torchvision's layout) of 178x218 JPEG 'faces': blobs of distinct colours."""
    folder = root / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:218, 0:178]
    for i in range(count):
        centre = rng.uniform([70, 60], [150, 120])
        blob = np.exp(-(((yy - centre[0]) / 45) ** 2 + ((xx - centre[1]) / 35) ** 2))
        colour = rng.uniform(40, 255, size=3)
        pixels = (blob[..., None] * colour + (1 - blob[..., None]) * 30).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"{i + 1:06d}.jpg", quality=90)
    return root


@pytest.fixture
def celeba_root(tmp_path: Path) -> Path:
    return make_celeba(tmp_path / "data")


def assert_same_training(a: dict, b: dict) -> None:
    """Bit-identical networks, optimizer states, data position and latent stream."""
    assert a["step"] == b["step"]
    for part in ("generator", "discriminator", "generator_ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    for part in ("optimizer_g", "optimizer_d"):
        for index, values in a[part]["state"].items():
            for name, value in values.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(b[part]["state"][index][name])), (
                    part,
                    index,
                    name,
                )
    assert a["data"] == b["data"] and torch.equal(a["rng"]["noise"], b["rng"]["noise"])


def assert_refused(main: Callable[[List[str]], None], program: str, args: List[str], expected: str, capsys) -> None:
    """`main(args)` (a command's entry point, in-process) exits 2 with one line on stderr holding `expected`."""
    with pytest.raises(SystemExit) as exit:
        main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit.value.code == 2, (args, err)
    assert len(lines) == 1 and lines[0].startswith(f"{program}: error: ") and expected in lines[0], (args, lines)
    assert "Traceback" not in err


def assert_eval_refused(args: List[str], expected: str, capsys) -> None:
    """gan-eval (in-process) exits 2 ending with one error line holding `expected`; what it measures (the counts)
    may be said before it, nothing after, and no traceback."""
    from dcgan import cli

    with pytest.raises(SystemExit) as exit:
        cli.eval_main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2, (args, lines)
    errors = [line for line in lines if line.startswith("gan-eval: error:")]
    assert errors == lines[-1:] and expected in errors[0] and "Traceback" not in "".join(lines), (args, lines)
