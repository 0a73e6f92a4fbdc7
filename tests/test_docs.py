"""Every command in README.md and docs/*.md runs, so the manual cannot rot.

Each ```bash block is read as a user would paste it: continuation lines joined, comments dropped, `a && b`
as two commands, a heredoc (`cat > FILE <<'EOF'`) as one. The pages run in reading order (README, then
data, training, sampling, evaluation, extending, reliability, results, sweeps, then the rest) in one
folder, blocks and commands in order, so a page may sample the quick start's checkpoint.

How a command runs, within this test's budget (about a minute on two cores):
- gan-train whose run folder a later command reads (a chain's first link): the installed console script,
  shrunk by SHRINK (2 steps, tiny networks); every other gan-train (and torchrun's gan-train arguments) is
  composed and validated exactly as gan-train does before it starts, which is where a wrong key, type or
  value in a doc would fail;
- gan-sample, gan-eval, gan-report, python scripts/...: the first of each kind as the installed console
  script (or the script) in a subprocess, the others through the same entry point in this process, but for
  gan-eval, whose later commands are composed and validated as gan-eval does first (Inception's forward
  pass on a CPU would cost this test's budget; tests/test_evaluate.py runs gan-eval end to end);
- torchrun: its gan-train arguments composed and validated (tests/test_distributed.py launches torchrun);
- mkdir and heredocs: bash.
Data roots and the Inception weights in the docs are pointed at test data (REPLACE). A command that cannot
run here is listed in NOT_RUN, by its exact text, with the reason; any other command fails the test until it
runs or is listed, and a listed command that no doc holds any more fails it too.
"""

from __future__ import annotations

import re
import shlex
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import pytest

from dcgan import cli
from dcgan.config import compose, validate_train, with_config_dir
from dcgan.evaluate import validate_eval

from conftest import FAST, REPO, WEIGHTS, make_celeba, run_cli

ORDER = ["data", "training", "sampling", "evaluation", "extending", "reliability", "results", "sweeps"]
COMMANDS = ("gan-train", "gan-sample", "gan-eval", "gan-report")

# Appended to a command whose text matches the pattern (the last value of a key wins).
SHRINK: Dict[str, List[str]] = {
    r"^gan-train ": [
        *FAST,
        "trainer.max_steps=2",
        "trainer.ema=0",
        "trainer.grid_size=16",
        "dataset.max_images=64",
    ],
    # A conditional run's grids are one row per class at the default size, which a smaller grid_size would break.
    r"^gan-train .*conditional=true": ["trainer.grid_size=64"],
    r"^gan-sample .*mode=seeds": ["seeds=0-7"],
    r"^gan-sample .*mode=neighbors": ["seeds=0-1", "k=2"],
    r"^gan-sample .*mode=interpolate": ["frames=2"],
    r"^gan-sample ": ["device=cpu"],
    # KID only: FID's eigendecomposition of a 2048x2048 matrix costs more than all the rest on a CPU, whatever n
    # is; tests/test_evaluate.py measures FID through gan-eval.
    r"^gan-eval ": ["n=8", "reference_n=8", "metrics=[kid]", "kid_subset_size=4", "kid_subsets=2", "device=cpu"],
    r"^python scripts/preset_cost.py": [
        *("--presets", "keras_fashion", "--warmup", "1", "--steps", "1"),
        *("--overrides", "trainer.batch_size=8 trainer.ema=0 generator.width=0.25 discriminator.width=0.25"),
    ],
}

HOURS_ON_A_CPU = "a measurement's own command (minutes to hours); tests/test_bench.py runs scripts/bench.py shrunk"
NEEDS_CUDA = "needs CUDA GPUs"
NOT_RUN: Dict[str, str] = {
    "python -m venv .venv": "set-up: makes a virtual environment (tests/test_install.py installs into one)",
    "source .venv/bin/activate": "set-up: a shell's own command",
    "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu": "set-up: needs the internet",
    "pip install .": "set-up: tests/test_install.py installs the package",
    "pip install .[test]": "the test suite itself (.ci/run runs it)",
    "ruff check src tests scripts": "the test suite itself (.ci/run runs it)",
    "python -m pytest -q -n 2": "the test suite itself (.ci/run runs it)",
    "torchrun --standalone --nproc_per_node=8 -m dcgan preset=dcgan64 dataset.root=~/data "
    "trainer.batch_size=512": NEEDS_CUDA,
    "torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST0:29500 --rdzv-id=celeba128 -m "
    "dcgan dataset=celeba dataset.image_size=128 dataset.cache_dir=/shared/cache "
    "hydra.run.dir=/shared/runs/celeba128": "two machines with CUDA GPUs",
    # docs/PERFORMANCE.md: the commands that measured its tables
    "python scripts/bench.py --device cuda --data fashion_mnist --root /usr/share/datasets/fashion-mnist --image-size "
    "28 --batch-size 64 --steps 300 --warmup 30 --ours  --ours trainer.cuda_graphs=true": NEEDS_CUDA,
    "python scripts/bench.py --device cpu --data synthetic --image-size 32 --batch-size 32 --steps 20 --threads 1": (
        HOURS_ON_A_CPU
    ),
    "python scripts/bench.py --device cpu --data fashion_mnist --root /usr/share/datasets/fashion-mnist --max-images "
    "10000 --image-size 32 --batch-size 64 --steps 30 --warmup 5 --threads 1 --repeat 3 --ours  --ours "
    "trainer.channels_last=false --ours trainer.channels_last=false trainer.fused_optimizer=false --ours "
    "trainer.amp=true --ours trainer.compile=true --ours trainer.channels_last=false trainer.compile=true": (
        HOURS_ON_A_CPU
    ),
    "python scripts/bench.py --device cpu --data fashion_mnist --root /usr/share/datasets/fashion-mnist --max-images "
    "10000 --image-size 64 --batch-size 32 --steps 10 --warmup 3 --threads 1 --repeat 3 --ours  --ours "
    "trainer.channels_last=false --ours trainer.channels_last=false trainer.fused_optimizer=false --ours "
    "trainer.compile=true": HOURS_ON_A_CPU,
    "python scripts/gpu_check.py": NEEDS_CUDA + " (tests/test_gpu_check.py runs its --smoke mode on the CPU)",
    "python scripts/bench.py --device cuda --data fashion_mnist --root /usr/share/datasets/fashion-mnist --image-size "
    "64 --batch-size 128 --steps 200 --warmup 20 --repeat 3 --ours trainer.amp=off --ours trainer.amp=bf16 --ours "
    "trainer.cuda_graphs=true trainer.amp=off --ours trainer.cuda_graphs=true trainer.amp=bf16 --ours "
    "trainer.compile=true --ours trainer.channels_last=false --ours trainer.fused_optimizer=false": NEEDS_CUDA,
    "for batch in 512 2048; do python scripts/bench.py --device cuda --data fashion_mnist --root "
    "/usr/share/datasets/fashion-mnist --image-size 64 --batch-size $batch --steps 100 --warmup 20 --ours  --ours "
    "trainer.cuda_graphs=true trainer.amp=bf16; done": NEEDS_CUDA,
    "python -m pytest -q tests/test_cuda_only.py tests/test_speed_path.py": "the CUDA-only tests (they skip without "
    "a GPU)",
    "python scripts/bench.py --device cpu --data fashion_mnist --root /usr/share/datasets/fashion-mnist --max-images "
    "10000 --image-size 64 --batch-size 32 --steps 10 --warmup 3 --threads 1 --repeat 3 --ours trainer.amp=off --ours "
    "trainer.amp=bf16": HOURS_ON_A_CPU,
    "python scripts/bench.py --device cpu --data fashion_mnist --root /usr/share/datasets/fashion-mnist --max-images "
    "10000 --image-size 32 --batch-size 64 --steps 30 --warmup 5 --threads 1 --repeat 3 --ours trainer.amp=off --ours "
    "trainer.amp=bf16": HOURS_ON_A_CPU,
    "python scripts/precision_quality.py --steps 300 --batch-size 64 --eval-n 1000 --reference-n 1000": (
        "two training runs and two gan-evals with Inception on a CPU (tens of minutes)"
    ),
}


@dataclass
class Command:
    page: str
    words: List[str]  # as the shell splits it
    script: str = ""  # a heredoc or mkdir: run by bash as written

    @property
    def text(self) -> str:
        return self.script or " ".join(self.words)


def pages() -> List[Path]:
    docs = sorted((REPO / "docs").glob("*.md"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else 99, p.name))
    return [REPO / "README.md", *docs]


def commands_of(page: Path) -> List[Command]:
    """The commands of a page's ```bash blocks, in order."""
    found: List[Command] = []
    for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), flags=re.M | re.S):
        lines = iter(block.replace("\\\n", " ").splitlines())
        for line in lines:
            if "<<'EOF'" in line:  # a heredoc: the file's lines up to EOF belong to the command
                body = [line]
                for rest in lines:
                    body.append(rest)
                    if rest == "EOF":
                        break
                found.append(Command(page.name, shlex.split(line, comments=True), "\n".join(body)))
                continue
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                found.append(Command(page.name, words[:cut]))
                words = words[cut + 1 :]
    for command in found:
        if command.words[:1] == ["mkdir"]:
            command.script = " ".join(map(shlex.quote, command.words))
    return found


def write_idx_images(path: Path, count: int) -> None:
    """An MNIST-format image file of `count` 28x28 images (what dataset.root of fashion_mnist points at)."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    path.write_bytes(struct.pack(">IIII", 0x00000803, count, 28, 28) + pixels.tobytes())


@pytest.fixture
def replacements(tmp_path: Path) -> Dict[str, str]:
    celeba = make_celeba(tmp_path / "data", count=8)
    fashion = tmp_path / "fashion"
    fashion.mkdir()
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        write_idx_images(fashion / name, 64)
    return {
        "~/data": str(celeba),
        "~/photos/cats": str(celeba / "celeba" / "img_align_celeba"),
        "/usr/share/datasets/fashion-mnist": str(fashion),
        "/path/inception-2015-12-05-fidelity.pth": str(WEIGHTS),
    }


def shrunk(command: Command, replace: Dict[str, str]) -> List[str]:
    words = [word for word in command.words]
    for old, new in replace.items():
        words = [word.replace(old, new) for word in words]
    for pattern, extra in SHRINK.items():
        if re.search(pattern, command.text):
            words += extra
    return words


def run_dir_of(words: List[str]) -> str:
    return next((w.split("=", 1)[1] for w in words if w.startswith("hydra.run.dir=")), "")


def reads(text: str, folder: str) -> bool:
    """Whether commands name this folder itself, or a file in it (runs/a is not runs/ab)."""
    return re.search(rf"(^|[\s=]){re.escape(folder)}(/|\s|$)", text) is not None


def compose_like_gan_train(args: List[str]) -> None:
    """What gan-train checks before it writes anything (cli.train_main): compose and validate."""
    args = with_config_dir(args)
    if "--cfg" in args:
        del args[args.index("--cfg") : args.index("--cfg") + 2]
    validate_train(compose("train", [a for a in args if not a.startswith("-")]))


ENTRY_POINTS: Dict[str, Callable[[List[str]], None]] = {
    "gan-sample": cli.sample_main,
    "gan-eval": cli.eval_main,
    "gan-report": cli.report_main,
}


def in_process(program: str, args: List[str]) -> None:
    try:
        ENTRY_POINTS[program](args)
    except SystemExit as exit:
        assert exit.code in (0, None), f"{program} {' '.join(args)} exited {exit.code}"


def test_every_documented_command_runs(tmp_path: Path, replacements: Dict[str, str], monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # relative paths in the docs (runs/quickstart, my_configs) land here
    # docs/sweeps.md's commands are sweeps: tests/test_study.py runs each of them as one.
    everything = [command for page in pages() for command in commands_of(page) if command.page != "sweeps.md"]
    unlisted = [f"{c.page}: {c.text}" for c in everything if c.text not in NOT_RUN and not runnable(c)]
    assert not unlisted, "commands in the docs that this test neither runs nor lists in NOT_RUN:\n" + "\n".join(
        unlisted
    )
    stale = set(NOT_RUN) - {c.text for c in everything}
    assert not stale, f"NOT_RUN lists commands no doc holds any more: {sorted(stale)}"
    really_ran = set()
    for index, command in enumerate(everything):
        if command.text in NOT_RUN:
            continue
        if "inception" in command.text and not WEIGHTS.is_file():
            continue  # needs_weights: this machine has no Inception weights file
        args = shrunk(command, replacements)
        program = args[0]
        # What later commands read: a later gan-train into the same hydra.run.dir only writes there.
        later = re.sub(r"hydra\.run\.dir=\S+", "", " ".join(c.text for c in everything[index + 1 :]))
        if command.script:
            subprocess.run(["bash", "-c", command.script], cwd=work, check=True)
        elif program == "gan-train":
            run_dir = run_dir_of(args)
            if run_dir and not Path(run_dir).exists() and reads(later, run_dir):  # a chain's first link
                run_cli(program, args[1:], cwd=work, timeout=600)
                really_ran.add(program)
            else:
                compose_like_gan_train(args[1:])
        elif program == "torchrun":
            compose_like_gan_train(args[args.index("dcgan") + 1 :])
        elif program == "python":
            result = subprocess.run(
                [sys.executable, str(REPO / args[1]), *args[2:]], cwd=work, capture_output=True, text=True, timeout=600
            )
            assert result.returncode == 0, f"{command.text}:\n{result.stderr[-3000:]}"
            really_ran.add(f"python {args[1]}")
        elif program not in really_ran:
            run_cli(program, args[1:], cwd=work, timeout=600)
            really_ran.add(program)
        elif program == "gan-eval":  # Inception's forward pass is the cost: the first one measured, these checked
            validate_eval(compose("eval", args[1:]))
        else:
            in_process(program, args[1:])
    kinds = {c.words[0] for c in everything if c.words[0] in COMMANDS and c.text not in NOT_RUN}
    if not WEIGHTS.is_file():
        kinds.discard("gan-eval")
    assert kinds <= really_ran, f"never run as an installed command: {kinds - really_ran}"


def runnable(command: Command) -> bool:
    first = command.words[0]
    if command.script:
        return True
    if first in COMMANDS:
        return True
    if first == "torchrun":
        return "dcgan" in command.words and "trainer.device=cpu" in command.words
    return first == "python" and command.words[1:2] == ["scripts/preset_cost.py"]


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_and_anchor_resolves():
    # docs/sweeps.md is written in its own change; its links are checked once it is here.
    pending = {REPO / "docs" / "sweeps.md"} - set(pages())
    broken = []
    for page in pages():
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if file in pending:
                continue
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md":
                headings = re.findall(
                    r"^#+ (.*)$", re.sub(r"^```.*?^```", "", file.read_text(), flags=re.M | re.S), flags=re.M
                )
                if anchor not in {slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "dead links:\n" + "\n".join(broken)
