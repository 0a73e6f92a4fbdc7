"""No traceback on any command: every bad input gets one line on stderr and exit code 2, and leaves
the run it read from as it was.

Each command is driven through a table of bad inputs by kind (output paths, numbers at their limits,
files read back); most run in-process through main(), a handful as real processes to prove that no
traceback reaches a user.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image

from dcgan import cli, data
from dcgan.data import DatasetConfig
from dcgan.layout import RunFolder

from conftest import BIN, FAST, assert_refused, run_cli

HUGE_SEED = 2**64 - 1  # the largest seed torch takes: any seed after it overflows
NOT_WRITABLE = Path("/proc/dcgan-test/out")  # nothing can be made in /proc, not even by root


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One tiny training run: checkpoints, two progress grids, metrics.jsonl."""
    root = tmp_path_factory.mktemp("bad_inputs")
    run_cli(
        "gan-train",
        [
            *FAST,
            "trainer.max_steps=4",
            "trainer.sample_every=2",
            "trainer.log_every=2",
            "trainer.ckpt_every=4",
            f"hydra.run.dir={root / 'run'}",
        ],
        cwd=root,
    )
    return root / "run"


@pytest.fixture(scope="module")
def files(run: Path, tmp_path_factory) -> Dict[str, Path]:
    """Bad files beside the run: a checkpoint from a 'newer version', a folder with a truncated PNG, a plain file."""
    root = tmp_path_factory.mktemp("bad_files")
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    state["config_yaml"] = state["config_yaml"].replace("trainer:\n", "trainer:\n  warp_drive: true\n", 1)
    torch.save(state, root / "newer.pt")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((28, 28), 60 * i, np.uint8), "L").save(images / f"{i}.png")
    (images / "1.png").write_bytes((images / "1.png").read_bytes()[:60])
    (root / "a_file").write_text("not a folder")
    (root / "empty.pt").touch()  # a checkpoint write cut off at its start
    (root / "a_folder").mkdir()
    (root / "a_dangling_link").symlink_to(root / "gone")
    return {
        "root": root,
        "link": root / "a_dangling_link",
        "newer": root / "newer.pt",
        "empty": root / "empty.pt",
        "images": images,
        "file": root / "a_file",
        "folder": root / "a_folder",
    }


def snapshot(folder: Path) -> Dict[str, str]:
    """Every entry under `folder`, with a hash of each file's bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
        for path in sorted(folder.rglob("*"))
    }


def with_checkpoint(args: List[str], run: Path) -> List[str]:
    """The run's checkpoint is what is read, unless the case names its own input."""
    own_input = any(arg.startswith(("ckpt=", "input1=")) for arg in args)
    return args if own_input else [f"ckpt={run / 'checkpoints' / 'last.pt'}", *args]


# ---------------------------------------------------------------- gan-sample

SAMPLE_CASES = {
    # output paths
    "out is a folder": (lambda f: [f"out={f['folder']}"], "is a folder, but a grid is one file"),
    "out without a suffix": (lambda f: [f"out={f['root'] / 'grid'}"], "has no suffix"),
    "out with an unknown suffix": (lambda f: [f"out={f['root'] / 'grid.xyz'}"], "has the suffix .xyz"),
    "out inside a file": (lambda f: [f"out={f['file'] / 'grid.png'}"], "is a file, not a folder"),
    "out under a dangling link": (lambda f: [f"out={f['link'] / 'grid.png'}"], "which does not exist; make that"),
    "out cannot be written": (lambda f: [f"out={NOT_WRITABLE}.png"], "cannot write in"),
    "seeds into a file": (lambda f: ["mode=seeds", "out=faces.png"], "into a folder"),
    "movie with an unknown suffix": (lambda f: ["mode=interpolate", "out=walk.mp4"], "has the suffix .mp4"),
    "export with an image suffix": (lambda f: ["mode=export", "out=g.png"], "torchscript export is written as .pt"),
    # numbers at their limits
    "reversed seed range": (lambda f: ["mode=seeds", "seeds=5-2"], "runs backwards"),
    "empty seed list": (lambda f: ["mode=seeds", "seeds=,"], "names no seeds"),
    "walk standing still": (lambda f: ["mode=interpolate", "seeds=1,1,2"], "1 then 1 is the same seed twice in a row"),
    "seed beyond 64 bits": (lambda f: ["mode=seeds", f"seeds={HUGE_SEED + 1}"], "64-bit"),
    "grid running past 64 bits": (lambda f: [f"seed={HUGE_SEED}", "n=2"], "64-bit"),
    "absurd seed range": (lambda f: ["mode=seeds", "seeds=0-99999999999"], "at most 1,000,000"),
    "scale of 0": (lambda f: ["scale=0"], "scale must be a whole number from 1 to 16"),
    "scale of an export": (lambda f: ["mode=export", "scale=2"], "leave scale out"),
    "scale past what viewers open": (lambda f: ["n=1000", "scale=16"], "3872x60032 image, more than the 89,478,485"),
    # files read back
    "checkpoint from a newer version": (lambda f: [f"ckpt={f['newer']}"], "trainer.warp_drive"),
    "empty checkpoint": (lambda f: [f"ckpt={f['empty']}"], "is unreadable (an empty file)"),
    "checkpoint that is a device": (lambda f: ["ckpt=/dev/null"], "/dev/null is not a regular file"),
    # the command line's spellings: nothing is taken without an effect, nothing ends in a traceback
    "misspelt key added with +": (lambda f: ["+nn=3"], "unknown config key nn: did you mean n?"),
    "interpolation that does not resolve": (lambda f: ["out=${nope}.png"], "key 'nope' not found"),
    "a sweep flag": (lambda f: ["-m", "n=4"], "-m would have no effect: gan-sample takes KEY=VALUE settings only"),
    "a Hydra setting": (lambda f: ["hydra.run.dir=x"], "hydra.run.dir=x would have no effect"),
}


@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_gan_sample_refuses(case: str, run: Path, files: Dict[str, Path], tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args, expected = SAMPLE_CASES[case]
    before = snapshot(run)
    assert_refused(cli.sample_main, "gan-sample", [*with_checkpoint(args(files), run), "device=cpu"], expected, capsys)
    assert snapshot(run) == before and not any(tmp_path.iterdir())


# ---------------------------------------------------------------- gan-eval

EVAL_CASES = {
    "out is a folder": (lambda f: [f"out={f['folder']}"], "is a folder"),
    "out is not json": (lambda f: [f"out={f['root'] / 'scores.txt'}"], "has the suffix .txt"),
    "out inside a file": (lambda f: [f"out={f['file'] / 'scores.json'}"], "is a file, not a folder"),
    "out cannot be written": (lambda f: [f"out={NOT_WRITABLE}.json"], "cannot write in"),
    # the feature cache is written after minutes of measuring: its folder is checked before
    "cache_dir is a file": (lambda f: [f"cache_dir={f['file']}"], "cache_dir: "),
    "cache_dir a dangling link": (lambda f: [f"cache_dir={f['link']}"], "is a symbolic link to"),
    "seeds past 64 bits": (lambda f: [f"seed={HUGE_SEED}"], "64-bit"),
    "truncated PNG in a folder": (lambda f: [f"input1={f['images']}", f"input2={f['images']}"], "cannot read image"),
    "checkpoint from a newer version": (
        lambda f: [f"ckpt={f['newer']}", f"out={f['root'] / 'newer.json'}"],
        "newer version",
    ),
    "misspelt key of a data set, added with +": (
        lambda f: ["dataset=mnist_tiny", "+dataset.roott=x"],
        "unknown config key dataset.roott: did you mean dataset.root?",
    ),
}


@pytest.mark.parametrize("case", EVAL_CASES)
def test_gan_eval_refuses_before_measuring(case: str, run: Path, files: Dict[str, Path], capsys):
    """Default n=10000 and no weights: any of these found after measuring would take minutes and fail differently."""
    args, expected = EVAL_CASES[case]
    before = snapshot(run)
    assert_refused(cli.eval_main, "gan-eval", [*with_checkpoint(args(files), run), "device=cpu"], expected, capsys)
    assert snapshot(run) == before and not (files["root"] / "newer.json").exists()


def test_gan_eval_out_is_checked_in_a_real_process(run: Path, files: Dict[str, Path], tmp_path: Path):
    result = run_cli(
        "gan-eval", [f"ckpt={run / 'checkpoints' / 'last.pt'}", f"out={files['folder']}"], cwd=tmp_path, check=False
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"gan-eval: error: out={files['folder']} is a folder, but gan-eval's "
        "result "
        f"is one file; name the file, e.g. out={files['folder'] / 'out.json'}"
    ]


# ---------------------------------------------------------------- gan-train

TRAIN_CASES = {
    "seed whose derived seeds overflow": ([f"trainer.seed={HUGE_SEED}"], "trainer.seed uses seeds"),
    "image size too large for memory": (["dataset.image_size=65536"], "GiB"),
    "evaluation without Inception weights": (["trainer.eval_every=2"], "eval.inception_weights=PATH"),
    "image folder that does not exist": (["dataset=folder", "dataset.root=/no/such/photos"], "is not a folder"),
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_gan_train_refuses_before_the_run_starts(case: str, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached download of the Inception weights here
    args, expected = TRAIN_CASES[case]
    run_dir = tmp_path / "run"
    assert_refused(
        cli.train_main, "gan-train", [*FAST, "trainer.max_steps=2", *args, f"hydra.run.dir={run_dir}"], expected, capsys
    )
    assert not run_dir.exists()


def test_gan_train_without_celeba_says_what_to_get_and_leaves_no_run_folder(tmp_path: Path, monkeypatch, capsys):
    """Offline and without the files: one line naming the files, their sizes, the absolute folder and the command
    to run then; and no outputs/DATE/TIME folder, since the data is checked before Hydra makes one."""
    monkeypatch.chdir(tmp_path)
    args = ["dataset=celeba", "dataset.root=data", "dataset.download=false"]
    assert_refused(cli.train_main, "gan-train", args, f"put both in {tmp_path.resolve() / 'data' / 'celeba'}/", capsys)
    assert list(tmp_path.iterdir()) == []


def test_gan_train_image_size_in_a_real_process(tmp_path: Path):
    result = run_cli(
        "gan-train", [*FAST, "dataset.image_size=65536", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, check=False
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "dataset.image_size=65536" in result.stderr and not (tmp_path / "run").exists()


def test_gan_train_refuses_a_checkpoint_from_a_newer_version(run: Path, files: Dict[str, Path], tmp_path: Path, capsys):
    before = snapshot(run)
    assert_refused(
        cli.train_main,
        "gan-train",
        [*FAST, "trainer.max_steps=2", f"trainer.resume={files['newer']}", f"hydra.run.dir={tmp_path / 'run'}"],
        "upgrade dcgan",
        capsys,
    )
    assert snapshot(run) == before


# ---------------------------------------------------------------- gan-report


@pytest.fixture
def run_copy(run: Path, tmp_path: Path) -> Path:
    """gan-report writes its figures into the run, so each test reports on a copy."""
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_gan_report_refuses_a_run_whose_grids_are_all_damaged(run_copy: Path, capsys):
    (run_copy / "metrics.jsonl").unlink()
    for grid in (run_copy / "samples").glob("step_*.png"):
        grid.write_bytes(grid.read_bytes()[:100])
    before = snapshot(run_copy)
    assert_refused(cli.report_main, "gan-report", [f"run={run_copy}"], "can be read", capsys)
    assert snapshot(run_copy) == before


def test_gan_report_skips_a_damaged_grid(run_copy: Path, caplog, capsys):
    grid = run_copy / "samples" / "step_000002.png"
    grid.write_bytes(grid.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        cli.report_main([f"run={run_copy}"])
    assert "skipped 1 damaged grid(s)" in caplog.text and "step_000002.png" in caplog.text
    assert "wrote" in capsys.readouterr().out and RunFolder(run_copy).progress_movie.is_file()


def test_gan_report_skips_a_truncated_last_metrics_line(run_copy: Path):
    """A run killed mid-append leaves half a line: the figure is still drawn from the others, with one warning."""
    with open(run_copy / "metrics.jsonl", "a") as file:
        file.write('{"step": 6, "loss_d": 1.2, "lo')
    result = run_cli("gan-report", [f"run={run_copy}"], cwd=run_copy)
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"gan-report: {run_copy / 'metrics.jsonl'}: skipped 1 line(s) that are not metrics rows (line 3; cut short by "
        "a killed run?)"
    ]
    assert RunFolder(run_copy).loss_figure.is_file()


# ---------------------------------------------------------------- --help


@pytest.mark.parametrize(
    "program, main", [("gan-sample", cli.sample_main), ("gan-eval", cli.eval_main), ("gan-report", cli.report_main)]
)
def test_help_prints_usage(program: str, main, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0 and out.startswith(f"usage: {program} ") and "Settings, given as KEY=VALUE" in out


@pytest.mark.parametrize("program", ["gan-sample", "gan-train"])
def test_help_in_a_real_process(program: str, tmp_path: Path):
    result = run_cli(program, ["--help"], cwd=tmp_path)
    assert result.stdout.startswith(f"usage: {program} ")  # gan-train's from Hydra's help header, in train.yaml
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "program, flag", [("gan-train", "--help"), ("gan-train", "--hydra-help"), ("gan-eval", "--help")]
)
def test_help_piped_into_a_reader_that_stops_early_ends_quietly(program: str, flag: str, tmp_path: Path):
    """`gan-train --help | head -1`: the reader closes the pipe; exit 0 and no BrokenPipeError traceback."""
    pipeline = f"{BIN / program} {flag} | head -1 > /dev/null; exit ${{PIPESTATUS[0]}}"
    result = subprocess.run(["bash", "-c", pipeline], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == ""


# ---------------------------------------------------------------- data sets


def test_a_file_name_that_is_not_utf8_is_named_escaped(tmp_path: Path, caplog):
    """Linux names are bytes: an unreadable b'bad\\xff.png' is named as bad\\xff.png, not a logging error."""
    root = tmp_path / "images"
    root.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 50 * i, np.uint8), "RGB").save(root / f"{i}.png")
    (root / "0.png").rename(root / b"good\xfe.png".decode("utf-8", "surrogateescape"))  # readable, so it is used
    (root / b"bad\xff.png".decode("utf-8", "surrogateescape")).write_bytes(b"\x89PNG not really")
    with caplog.at_level(logging.WARNING, logger="dcgan.data"):
        images = data.load_images(DatasetConfig(name="folder", root=str(root), image_size=16, channels=3))
    assert len(images) == 4
    warning = next(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
    assert "bad\\xff.png" in warning
    warning.encode("utf-8")  # strict: what a log file handler does
