"""The run folder: where a run's files live, who owns it, and what a new invocation may do in it.

Rules (docs/reliability.md):
  one owner    A gan-train process holds an exclusive lock on RUN_DIR/.lock (flock) for its whole life;
               under torchrun, rank 0 holds it for the job. A second process exits 2 naming the
               owner's pid and host. The kernel drops the lock when its holder dies, SIGKILL included,
               so a killed run never leaves a stale lock behind (the file stays; only the lock counts).
  no overwrite A folder that holds a run (checkpoints, metrics, grids or a run card) is continued
               (`trainer.resume=auto`), or replaced on request (`trainer.overwrite=true`: the old files
               move to RUN_DIR/replaced/<time>/, nothing is deleted); anything else exits 2 before a
               file is written.
  unreadable   `trainer.resume=auto` over checkpoints none of which can be read exits 2 naming each
               file and why, instead of starting a new run over them.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import platform
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch.distributed as dist
from omegaconf import DictConfig

from dcgan import checkpoint, config, data, distributed, files, runcard
from dcgan.errors import UserError
from dcgan.layout import RunFolder
from dcgan.state import CONFIG_YAML, STEP, check_same_classes

try:
    import fcntl
except ImportError:  # Windows: no flock; the folder is then not guarded against a second process
    fcntl = None

log = logging.getLogger(__name__)

HYDRA_RECORD = ".hydra"  # Hydra writes it (and the job's .log) into the folder before the task runs


def describe_run(run: RunFolder) -> str:
    """'a run at step N' from its newest readable checkpoint, else from its run card."""
    found, _ = checkpoint.find_latest(run.checkpoints)
    if found is not None:
        return f"a run at step {checkpoint.load(found)[STEP]} ({found.relative_to(run.root)})"
    return "files of an earlier run (no readable checkpoint)"


# ---------------------------------------------------------------- ownership

_held: Dict[Path, int] = {}  # folders whose lock this process holds -> the lock file's descriptor


def held(folder: Path) -> bool:
    """Whether this process holds `folder`'s lock already."""
    return Path(os.path.abspath(folder.expanduser())) in _held


def claim(folder: Path) -> bool:
    """Hold `folder`'s lock until `release_all` or the end of the process; False if this process holds it already.

    UserError if another process holds it.
    """
    folder = Path(os.path.abspath(folder.expanduser()))  # as Hydra spells its output_dir
    if folder in _held:
        return False
    if fcntl is None:
        _held[folder] = -1
        return True
    fd = _open_lock(RunFolder(folder).lock)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = _read_owner(fd)
        os.close(fd)
        raise UserError(
            f"{folder} is in use by another gan-train (pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, "
            f"since {owner.get('since', '?')}); wait for it to end, stop it, or pick another hydra.run.dir"
        ) from None
    record = (json.dumps({"pid": os.getpid(), "host": platform.node(), "since": _now()}) + "\n").encode()
    try:
        os.ftruncate(fd, 0)
        if os.pwrite(fd, record, 0) < len(record):  # a nearly full disk writes part of it and reports no error
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError as error:  # a full disk: the lock holds without its record, but the run would not get far
        os.close(fd)
        raise files.not_written(RunFolder(folder).lock, error.strerror or str(error), LOCK_ADVICE) from None
    _held[folder] = fd
    return True


LOCK_ADVICE = "free some disk space or pick another hydra.run.dir"


def _open_lock(lock: Path) -> int:
    """The lock file's descriptor, made if missing; what is in its way (a folder, a symbolic link, a folder
    we may not write) is one line naming it. A link is never followed: the lock belongs to this folder."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        if lock.is_symlink():
            found = f"a symbolic link (to {os.readlink(lock)}), not gan-train's lock file"
        elif lock.is_dir():
            found = "a folder, not gan-train's lock file"
        else:
            raise files.not_written(lock, error.strerror or str(error), LOCK_ADVICE) from None
        raise UserError(
            f"{lock} is {found}; remove it (gan-train makes the file itself) or pick another hydra.run.dir"
        ) from None


def take(folder: Path, cfg: DictConfig, keep: Iterable[str] = ()) -> None:
    """`claim` the folder, then `prepare` it, on rank 0; every rank of a torchrun job learns the outcome."""
    w = distributed.world()
    error: Optional[str] = None
    if w.is_main:
        try:
            resume = cfg.trainer.resume
            if resume and resume != "auto" and not held(folder):  # read before the lock file (and its folder) is
                check_resume(Path(resume), cfg)  # made, and before an overwrite moves anything: a refusal leaves none
            if claim(folder):  # main() takes the folder before Hydra; the task function then finds it taken
                prepare(folder, cfg, keep)
        except UserError as refused:
            error = str(refused)
    if w.enabled and dist.is_initialized():
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise UserError(error)


def release_all() -> None:
    for folder, fd in list(_held.items()):
        if fd >= 0:
            os.close(fd)  # closing the descriptor drops the flock
        del _held[folder]


def _read_owner(fd: int) -> Dict[str, str]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ---------------------------------------------------------------- what an invocation may do


def prepare(folder: Path, cfg: DictConfig, keep: Iterable[str] = ()) -> None:
    """Refuse to mix two runs in one folder, or replace the old one when asked; call with the lock held.

    trainer.resume=auto is checked against its checkpoint here too (checkpoint.changes_since), so a refused
    one changes no file (`take` checks trainer.resume=PATH before it makes the lock). `keep` names entries
    that belong to this invocation already (Hydra's record, in a multirun job).
    """
    run, resume, overwrite = RunFolder(folder), cfg.trainer.resume, cfg.trainer.overwrite
    earlier = runcard.read(folder)
    if earlier and earlier.get("status") == "failed":  # e.g. a full disk: say which file it could not write
        log.warning("the previous invocation in %s failed: %s", folder, earlier.get("error"))
    if overwrite:
        if resume and resume != "auto" and _inside(Path(resume), folder):
            raise UserError(
                f"trainer.overwrite=true would move {resume} aside before resuming from it; copy it out of "
                f"{folder} first"
            )
        if run.holds_a_run():
            moved_to = move_aside(run, keep)
            log.warning("trainer.overwrite=true: the earlier run in %s moved to %s", folder, moved_to)
        if resume == "auto":
            return
    if resume == "auto":
        found, refusals = checkpoint.find_latest(run.checkpoints)
        if found is None and refusals:
            raise UserError(
                f"trainer.resume=auto found checkpoints in {run.checkpoints} but can resume none of them: "
                f"{'; '.join(refusals)}. "
                "Nothing was changed. Use a version of this tool that reads them, pass trainer.resume=PATH, "
                "or start in another hydra.run.dir"
            )
        if found is None and run.holds_a_run():  # killed before its first checkpoint: keep what it left
            moved_to = move_aside(run, keep)
            log.warning(
                "trainer.resume=auto: %s has no checkpoint yet; its files moved to %s, starting fresh", folder, moved_to
            )
        if found is not None:
            check_resume(found, cfg)
        return
    if run.holds_a_run() and not (resume and _same_as_newest(Path(resume), run)):
        raise UserError(
            f"hydra.run.dir={folder} already holds {describe_run(run)}; continue it with trainer.resume=auto, "
            "start elsewhere with another hydra.run.dir, or replace it with trainer.overwrite=true "
            f"(its files then move to {run.replaced}/)"
        )


def check_resume(path: Path, cfg: DictConfig) -> None:
    """The checkpoint's config is one this version reads, the run changes nothing a resume can't change, and a
    conditional run's data has the checkpoint's classes."""
    saved = checkpoint.load(path)
    try:
        config.train_config_from_yaml(saved[CONFIG_YAML])
    except UserError as error:
        raise UserError(f"{path}: {error}") from None
    checkpoint.changes_since(saved, cfg, path)
    if cfg.conditional:  # label i must still mean class i: the data's classes, read without decoding an image
        names = data.check_labels_available(cfg.dataset)
        if names is not None:
            check_same_classes(saved, tuple(names))


def move_aside(run: RunFolder, keep: Iterable[str]) -> Path:
    """Move every entry of the folder but the lock, earlier replaced runs and `keep` to replaced/<time>/."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    target = run.replaced / stamp
    suffix = 1
    while target.exists():
        target, suffix = run.replaced / f"{stamp}_{suffix}", suffix + 1
    target.mkdir(parents=True)
    skip = {run.lock.name, run.replaced.name, *keep}
    for entry in sorted(run.root.iterdir()):
        if entry.name not in skip:
            entry.rename(target / entry.name)
    return target


def _inside(path: Path, folder: Path) -> bool:
    return path.expanduser().absolute().is_relative_to(folder.expanduser().absolute())


def _same_as_newest(path: Path, run: RunFolder) -> bool:
    """resume=PATH naming this folder's newest checkpoint continues the run, like resume=auto."""
    found, _ = checkpoint.find_latest(run.checkpoints)
    if found is None or not path.is_file():
        return False
    return checkpoint.load(found)[STEP] == checkpoint.load(path)[STEP] and _inside(path, run.root)


def hydra_record(job_name: str) -> List[str]:
    """What Hydra wrote into a job's folder before the task function ran."""
    return [HYDRA_RECORD, f"{job_name}.log"]
