"""What a run leaves for whoever wants to trace or repeat it: the run card, and deterministic mode.

RUN_DIR/run_card.json is written when training starts and updated when it ends, each time
atomically (a temporary file renamed over it). It holds:

  status        running, then completed | time limit (trainer.max_minutes) | interrupted (a signal;
                see `signal`) | diverged (see `health` and `action`) | failed (see `error`). A card
                still "running" when the next run starts was left by a process that was killed or crashed.
  objective     under a sweep (sweep.py): the score returned to the sweeper, its metric and protocol
  command, cwd  sys.argv as gan-train saw it, and where it ran (and pid, host)
  start_step, final_step, seed, deterministic, device
  resume_changes  settings that differ from the checkpoint this invocation resumed from, {key: [old, new]}
  versions      python, torch, CUDA and cuDNN (None without them), torchvision, numpy, hydra-core
  git           `git rev-parse HEAD` of the working directory and whether tracked files differ, or None
  data          the data set's fingerprint: image count, shape and a SHA-256 of its pixels (all bytes
                up to HASH_ALL_BYTES; beyond that an evenly spaced sample of SAMPLED_IMAGES images)
  config        the resolved config
  previous      the cards of earlier invocations in this folder (a resume, a rollback), oldest first
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dcgan import distributed, files
from dcgan.errors import UserError, nearest_existing
from dcgan.layout import RunFolder

log = logging.getLogger(__name__)

HASH_ALL_BYTES = 256 * 2**20
SAMPLED_IMAGES = 4096
# Tells this process's card from an earlier one (a pid can repeat, e.g. as pid 1 in containers).
INVOCATION = uuid.uuid4().hex
PACKAGES = ("torchvision", "numpy", "hydra-core", "omegaconf", "pillow", "dcgan")


def start(
    run_dir: Path,
    cfg: DictConfig,
    images: torch.Tensor,
    device: torch.device,
    step: int,
    resume_changes: Optional[Dict[str, Any]] = None,
) -> None:
    """Write the card of this invocation; an earlier card in the folder moves into `previous`."""
    if not distributed.world().is_main:
        return
    earlier = read(run_dir)
    previous = earlier.pop("previous", []) if earlier else []
    if earlier:
        if earlier.get("status") == "running":
            earlier["status"] = "killed or crashed (ended without a report)"
        previous.append({k: v for k, v in earlier.items() if k != "config"})
    card = {
        "status": "running",
        "started": now(),
        "pid": os.getpid(),
        "invocation": INVOCATION,
        "command": list(sys.argv),
        "cwd": os.getcwd(),
        "start_step": step,
        "resume_changes": resume_changes or {},  # settings changed since the checkpoint: {key: [old, new]}
        "seed": cfg.trainer.seed,
        "deterministic": cfg.trainer.deterministic,
        "device": describe_device(device),
        "host": platform.node(),
        "versions": versions(),
        "git": git_revision(Path.cwd()),
        "data": data_fingerprint(images),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "previous": previous,
    }
    _write(run_dir, card)


def finish(run_dir: Path, step: int, signal: Optional[int], guard: Any, out_of_time: bool = False) -> None:
    """At the end of train(): how it ended, at which step, and what the health guard saw."""
    status = "diverged" if guard.fault is not None else "interrupted" if signal is not None else "completed"
    if status == "completed" and out_of_time:
        status = "time limit"  # trainer.max_minutes: resume=auto continues
    update(run_dir, status=status, final_step=step, signal=signal, health=guard.summary())


def update(run_dir: Path, **fields: Any) -> None:
    """Add fields to the card this process started (nothing if it never started one)."""
    card = read(run_dir) if distributed.world().is_main else None
    if card is None or card.get("invocation") != INVOCATION:
        return
    card.update(fields, ended=now())
    try:
        _write(run_dir, card)
    except OSError as error:  # a full disk must not hide the error that brought us here
        log.warning("could not update %s: %s", RunFolder(run_dir).card, error)


def read(run_dir: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(RunFolder(run_dir).card.read_text())
    except (OSError, ValueError):
        return None


def _write(run_dir: Path, card: Dict[str, Any]) -> None:
    files.atomic_write_text(RunFolder(run_dir).card, json.dumps(card, indent=2, default=str) + "\n")


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ---------------------------------------------------------------- the card's contents


def data_fingerprint(images: torch.Tensor) -> Dict[str, Any]:
    """Image count, shape and a SHA-256 of the uint8 pixels [N, C, H, W] (see HASH_ALL_BYTES)."""
    array = images.numpy()
    digest = hashlib.sha256(repr(tuple(array.shape)).encode())
    if array.nbytes <= HASH_ALL_BYTES:
        digest.update(np.ascontiguousarray(array).data)
        hashed = "all pixels and the shape"
    else:
        picked = np.unique(np.linspace(0, len(array) - 1, SAMPLED_IMAGES).round().astype(np.int64))
        for index in picked:  # one image at a time: a memory-mapped cache is read, not copied whole
            digest.update(np.ascontiguousarray(array[index]).data)
        hashed = f"{len(picked)} of {len(array)} images, evenly spaced, and the shape"
    return {"count": len(array), "shape": list(array.shape[1:]), "sha256": digest.hexdigest(), "hashed": hashed}


def versions() -> Dict[str, Optional[str]]:
    found: Dict[str, Optional[str]] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None,
    }
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_revision(folder: Path) -> Optional[Dict[str, Any]]:
    """The commit checked out in `folder` and whether tracked files changed since; None outside a repository."""

    def git(*args: str) -> Optional[str]:
        try:
            result = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):  # no git installed, or a very slow file system
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    revision = git("rev-parse", "HEAD")
    if revision is None:
        return None
    changes = git("status", "--porcelain", "--untracked-files=no")
    return {"revision": revision, "dirty": bool(changes) if changes is not None else None}


# ---------------------------------------------------------------- before and during training


def check_run_dir(run_dir: str, key: str = "hydra.run.dir") -> None:
    """Fail with one line, before Hydra tries, when the folder `key` names can't be created or written."""
    path = Path(run_dir).expanduser().absolute()
    existing = nearest_existing(key, path)
    if not existing.is_dir():
        raise UserError(f"{key}={run_dir} can't be created: {existing} is a file, not a folder; pick another {key}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key}={run_dir} can't be created or written: {existing} is not writable; pick another {key}")


def use_deterministic_algorithms(enabled: bool) -> None:
    """trainer.deterministic: PyTorch's deterministic kernels, with a warning (not an error) where an op has none.

    Deterministic cuBLAS needs CUBLAS_WORKSPACE_CONFIG before its first matmul; a value set by the
    user is kept. cuDNN's autotuner picks kernels by timing, so it is turned off.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = enabled
    torch.use_deterministic_algorithms(enabled, warn_only=True)
