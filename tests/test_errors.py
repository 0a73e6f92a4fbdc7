"""Every bad input ends with one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from dcgan import cli

from conftest import FAST, run_cli


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.foo=1", "unknown config key trainer.foo"),
        ("trainer.batch_size=abc", "could not be converted to Integer"),
        ("dataset=imagenet", "dataset=imagenet: no such option; dataset is one of celeba, fashion_mnist, folder,"),
        ("dataset=fashion-mnist", "did you mean dataset=fashion_mnist?"),
        ("trainer.batch_size=0", "trainer.batch_size must be >= 1"),
        ("optimizer.generator.lr=-1", "optimizer.generator.lr must be > 0"),
        ("dataset.image_size=30", "dataset.image_size=30"),
        ("dataset.channels=2", "dataset.channels must be one of 1, 3"),
        ("generator.arch=stylegan", "not an architecture"),
        ("optimizer.generator.name=Adamm", "not a torch.optim optimizer"),
        ("trainer.device=tpu", "trainer.device must be"),
        ("trainer.ema=1.5", "trainer.ema must be in [0, 1)"),
    ],
)
def test_bad_config_is_rejected_before_any_output(override: str, expected: str, tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit:
        cli.train_main([override, f"hydra.run.dir={run_dir}"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("gan-train: error:") and expected in err and err.count("\n") == 1
    assert not run_dir.exists()


def test_cli_config_error_exit_code(tmp_path: Path):
    result = run_cli("gan-train", ["trainer.max_stepz=3"], cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "unknown config key trainer.max_stepz" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_missing_mnist_offline(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(
        "gan-train",
        [
            *FAST,
            "dataset=mnist",
            f"dataset.root={empty}",
            "dataset.download=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train-images-idx3-ubyte" in result.stderr


def test_missing_folder(tmp_path: Path):
    result = run_cli(
        "gan-train",
        [*FAST, "dataset=folder", f"dataset.root={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2 and "nowhere" in result.stderr and "Traceback" not in result.stderr


def test_cuda_asked_for_without_cuda(tmp_path: Path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_cli(
        "gan-train", [*FAST, "trainer.device=cuda", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, check=False
    )
    assert result.returncode == 2 and "CUDA is not available" in result.stderr


@pytest.fixture(scope="module")
def damaged_checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("damaged")
    run_cli("gan-train", [*FAST, "trainer.max_steps=3", f"hydra.run.dir={root / 'run'}"], cwd=root)
    good = (root / "run" / "checkpoints" / "last.pt").read_bytes()
    truncated = root / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = root / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    return {"root": root, "truncated": truncated, "garbage": garbage, "run": root / "run"}


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_sample_from_damaged_checkpoint(kind: str, damaged_checkpoints: dict, tmp_path: Path):
    result = run_cli("gan-sample", [f"ckpt={damaged_checkpoints[kind]}"], cwd=tmp_path, check=False)
    assert result.returncode == 2 and "unreadable" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "grid.png").exists()


def test_resume_from_truncated_checkpoint(damaged_checkpoints: dict, tmp_path: Path):
    result = run_cli(
        "gan-train",
        [
            *FAST,
            "trainer.max_steps=5",
            f"trainer.resume={damaged_checkpoints['truncated']}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2 and "unreadable" in result.stderr


def test_resume_auto_falls_back_past_a_truncated_last(damaged_checkpoints: dict, tmp_path: Path):
    """A last.pt cut short (a kill during a copy, a full disk) is skipped for the newest good step file."""
    run = damaged_checkpoints["run"]
    last = run / "checkpoints" / "last.pt"
    last.unlink()  # a new file: last.pt is a hard link to the newest step file, which must stay good
    last.write_bytes(damaged_checkpoints["truncated"].read_bytes())
    run_cli("gan-train", [*FAST, "trainer.max_steps=5", "trainer.resume=auto", f"hydra.run.dir={run}"], cwd=tmp_path)
    from dcgan import checkpoint

    assert checkpoint.load(run / "checkpoints" / "last.pt")["step"] == 5


def test_sample_needs_a_checkpoint(tmp_path: Path):
    result = run_cli("gan-sample", [], cwd=tmp_path, check=False)
    assert result.returncode == 2 and "ckpt=PATH" in result.stderr
    result = run_cli("gan-sample", ["ckpt=missing.pt"], cwd=tmp_path, check=False)
    assert result.returncode == 2 and "does not exist" in result.stderr
