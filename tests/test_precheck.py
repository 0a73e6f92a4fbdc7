"""gan-train checks the config Hydra composed, and the folder Hydra will use, before anything is written.

Whatever the spelling of the command line (quoted, interpolated, `++`, `-cn`, `--config-dir`, `+` keys),
a refused invocation exits 2 with one line, leaves an existing run byte for byte as it was (Hydra's
`.hydra/` record included), and makes no folder. Most cases run in-process through cli.train_main
(Hydra's real command-line path); two run as real processes to prove no traceback reaches a user.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Dict, List

import pytest

from dcgan import cli, config

from conftest import FAST, run_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished two-step run, for the invocations that must leave it alone."""
    root = tmp_path_factory.mktemp("precheck")
    run_cli("gan-train", [*FAST, "trainer.max_steps=2", f"hydra.run.dir={root / 'mnist_tiny'}"], root)
    return root / "mnist_tiny"  # named after the data set, which an interpolated hydra.run.dir can name


def snapshot(folder: Path) -> Dict[str, str]:
    """Every entry and its bytes' hash, but the lock file, which names whoever held the lock last."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
        for path in sorted(folder.rglob("*"))
        if path.name != ".lock"
    }


# (how the command line spells it, what the one line must say); RUN is the existing run's folder,
# ROOT the folder around it, NEW a folder that does not exist yet and must not be made.
CASES = [
    ("quoted run dir", ["hydra.run.dir='RUN'"], "already holds a run at step 2"),
    ("interpolated run dir", ["hydra.run.dir=ROOT/${dataset.name}"], "ROOT/mnist_tiny already holds a run"),
    ("++ run dir", ["++hydra.run.dir=RUN"], "already holds a run at step 2"),
    ("-cn", ["-cn", "train", "hydra.run.dir=RUN"], "already holds a run at step 2"),
    ("--config-dir", ["--config-dir", "ROOT", "hydra.run.dir=RUN"], "already holds a run at step 2"),
    ("-cn, bad value", ["-cn", "train", "trainer.batch_size=-1", "hydra.run.dir=NEW"], "trainer.batch_size must be"),
    ("-cn, huge image", ["-cn", "train", "dataset.image_size=4096", "hydra.run.dir=NEW"], "GiB"),
    ("+ misspelt key", ["+trainer.max_step=3", "hydra.run.dir=NEW"], "did you mean trainer.max_steps?"),
    ("misspelt key", ["trainer.max_step=3", "hydra.run.dir=NEW"], "did you mean trainer.max_steps?"),
    ("wrong type", ["-cn", "train", "trainer.batch_size=abc", "hydra.run.dir=NEW"], "trainer.batch_size=abc"),
    ("unknown option", ["loss=hinje", "hydra.run.dir=NEW"], "hinge"),
    # An error other than ours in the check (here OmegaConf's) must stop Hydra too, not become a warning.
    ("unresolved interpolation", ["trainer.max_steps=${nope}", "hydra.run.dir=RUN"], "key 'nope' not found"),
    ("unresolved run dir", ["hydra.run.dir=ROOT/${nope}"], "key 'nope' not found"),
    ("Hydra's rerun", ["--experimental-rerun=ROOT/config.pickle"], "would run without gan-train's checks"),
    ("the check removed", ["~hydra.callbacks.precheck", "hydra.run.dir=RUN"], "already holds a run at step 2"),
    ("sweep, + misspelt key", ["-m", "loss=ns,hinge", "+trainer.max_step=3", "hydra.sweep.dir=NEW"], "max_steps?"),
    ("sweep under a file", ["-m", "loss=ns", "hydra.sweep.dir=ROOT/mnist_tiny/run_card.json/sweep"], "is a file"),
    ("sweep into a run", ["-m", "loss=ns", "hydra.sweep.dir=ROOT", "hydra.sweep.subdir=mnist_tiny"], "already hold"),
]


@pytest.mark.parametrize("spelling, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_refused_before_anything_is_written(
    spelling: List[str], expected: str, run: Path, tmp_path: Path, capsys, monkeypatch
):
    root = run.parent
    monkeypatch.chdir(tmp_path)  # Hydra's default outputs/ would land here
    before = snapshot(root)
    places = {"RUN": str(run), "ROOT": str(root), "NEW": str(tmp_path / "new")}
    args = [functools.reduce(lambda arg, place: arg.replace(*place), places.items(), a) for a in spelling]
    flags = args[: next(i for i, a in enumerate(args) if "=" in a)]  # -cn NAME, -m: flags first, as users type them
    with pytest.raises(SystemExit) as exit:
        cli.train_main([*flags, *FAST, "trainer.max_steps=1", *args[len(flags) :]])
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2, err
    assert expected.replace("ROOT", str(root)) in err and len(err.splitlines()) == 1, err
    assert snapshot(root) == before  # .hydra/, the log, the lock file: all as they were
    assert list(tmp_path.iterdir()) == []  # no new run folder, no outputs/


def test_no_traceback_reaches_the_user(run: Path, tmp_path: Path):
    for flags, args in ((["-cn", "train"], ["trainer.batch_size=-1"]), ([], ["+trainer.max_step=3"])):
        args = [*flags, *FAST, *args, f"hydra.run.dir={tmp_path / 'new'}"]
        result = run_cli("gan-train", args, tmp_path, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "new").exists()


def test_a_primary_config_of_the_users_own_is_checked_before_hydra_writes(run: Path, tmp_path: Path, capsys):
    """-cp/-cn: the user's primary config names none of our Hydra callbacks; gan-train adds its check."""
    (tmp_path / "mine.yaml").write_text("defaults:\n  - train_schema\n  - dataset: mnist_tiny\n  - _self_\n")
    before = snapshot(run.parent)
    with pytest.raises(SystemExit) as exit:
        cli.train_main(
            [
                "-cp",
                str(tmp_path),
                "-cn",
                "mine",
                "--config-dir",
                str(config.config_dir()),
                *FAST,
                f"hydra.run.dir={run}",
            ]
        )
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and "already holds a run at step 2" in err and len(err.splitlines()) == 1, err
    assert snapshot(run.parent) == before  # Hydra's .hydra/ record of the run as it was, no cli.log beside it


def test_an_optuna_search_with_no_trial_to_run_is_refused(tmp_path: Path, capsys, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install '.[sweep]'")
    monkeypatch.chdir(tmp_path)
    args = ["-m", "hparams_search=fashion_optuna", *FAST, "hydra.sweeper.n_trials=0", f"hydra.sweep.dir={tmp_path}/s"]
    with pytest.raises(SystemExit) as exit:
        cli.train_main(args)
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and err.startswith("gan-train: error: hydra.sweeper.n_trials=0 runs no trial"), err
    assert list(tmp_path.iterdir()) == []  # no study database, no sweep folder


def test_a_user_config_dir_adds_a_preset_and_its_values_are_checked(tmp_path: Path, capsys, monkeypatch):
    """--config-dir: a preset of the user's own, composed and checked like ours."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "preset").mkdir(parents=True)
    (tmp_path / "configs" / "preset" / "mine.yaml").write_text(
        "# @package _global_\ntrainer:\n  max_steps: 2\n  batch_size: 0\n"
    )
    with pytest.raises(SystemExit) as exit:
        cli.train_main(["--config-dir", str(tmp_path / "configs"), "preset=mine", *FAST[:2]])
    assert exit.value.code == 2 and "trainer.batch_size must be >= 1, got 0" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs"]
