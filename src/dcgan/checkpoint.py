"""Checkpoints: the whole training state in one file, written atomically, loaded safely.

A checkpoint is a dict of tensors, numbers and strings only (so `torch.load(weights_only=True)`
reads it without running code): model and optimizer state dicts, step, epoch, data position,
every RNG state, and the resolved config as YAML text, which is all `gan-sample` needs.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from dcgan import files
from dcgan.errors import UserError
from dcgan.layout import RunFolder
from dcgan.state import CONFIG_YAML, REQUIRED, conditional_changed

FORMAT_VERSION = 1
LAST = "last.pt"
BEST = "best.pt"  # the checkpoint with the best FID so far (trainer.eval_every); ignored by latest()
STEP_PATTERN = re.compile(r"^step_(\d{6,})\.pt$")
log = logging.getLogger(__name__)


def step_name(step: int) -> str:
    return f"step_{step:06d}.pt"


def save(state: Dict[str, Any], directory: Path, step: int, keep_last: int, keep_step: Optional[int] = None) -> Path:
    """Write `step_NNNNNN.pt` and replace `last.pt` with it; a kill at any moment leaves the old files whole.

    The bytes go to a temporary file that is fsynced, hard-linked as the step file, and renamed over
    last.pt (files.atomic_write); renames within a folder are atomic, so readers see either the old
    or the new file. Old step files beyond `keep_last` are removed only after the new ones are safely
    on disk, except the newest one at or before `keep_step` (the health guard's last trusted step; see guard.py).
    """
    directory.mkdir(parents=True, exist_ok=True)
    step_path = directory / step_name(step)
    _write(state, directory / LAST, also_as=step_path)
    _prune(directory, keep_last, keep_step)
    return step_path


def save_as(state: Dict[str, Any], path: Path) -> Path:
    """Write one named checkpoint (e.g. checkpoints/best.pt) atomically: temporary file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(state, path)
    return path


def _write(state: Dict[str, Any], path: Path, also_as: Optional[Path] = None) -> None:
    """fsynced and atomic; a failure (a full disk) is a UserError naming the file (the step file when there is one)."""
    try:
        versioned = {**state, "format_version": FORMAT_VERSION}
        files.atomic_write(path, lambda file: torch.save(versioned, file), fsync=True, also_as=also_as)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        raise _write_error(also_as or path, error) from None


def _write_error(path: Path, error: Exception) -> UserError:
    """One line naming the file that could not be written, why, and the space left on its disk."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else " ".join(str(error).split())[:160]
    advice = (
        "free some disk space or point hydra.run.dir at a writable folder, then continue with trainer.resume=auto "
        "(earlier checkpoints are untouched)"
    )
    return files.not_written(path, reason, advice, what="checkpoint ")


def _prune(directory: Path, keep_last: int, keep_step: Optional[int]) -> None:
    # Temporary checkpoints (.*.pt.tmp) left by a save that was killed; this one has finished.
    for stale in directory.glob(files.temporary_path(directory / "*.pt").name):
        stale.unlink(missing_ok=True)
    if keep_last <= 0:
        return
    steps = step_checkpoints(directory)
    trusted = [p for p in steps if keep_step is not None and step_of(p) <= keep_step][-1:]
    for old in steps[:-keep_last]:
        if old not in trusted:
            old.unlink(missing_ok=True)


def step_of(path: Path) -> int:
    """The step of a step_NNNNNN.pt file."""
    return int(STEP_PATTERN.match(path.name).group(1))


def step_checkpoints(directory: Path) -> list:
    """Step checkpoints in a folder, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


class Unreadable(UserError):
    """A checkpoint this version can't use; `reason` says why in a few words (for lists of refused files)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def load(path: str | Path, map_location: str | torch.device = "cpu") -> Dict[str, Any]:
    """Read a checkpoint written by `save`, or raise UserError saying what is wrong with the file."""
    path = Path(path)
    if path.is_dir():
        found = latest(path) or latest(RunFolder(path).checkpoints)
        if found is None:
            raise UserError(f"{path} is a folder with no checkpoints in it; pass a .pt file")
        path = found
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; check the path (checkpoints are in RUN_DIR/checkpoints/)")
    if not path.is_file():  # a device or a pipe: reading it would block or make no sense
        raise UserError(f"checkpoint {path} is not a regular file; pass a .pt file (in RUN_DIR/checkpoints/)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, wrong format, pickled code: all mean "not our checkpoint"
        # An empty file (a write cut off at its start) makes torch raise with no message.
        reason = " ".join(str(error).split())[:200] or (
            "an empty file" if path.stat().st_size == 0 else type(error).__name__
        )
        raise Unreadable(
            f"checkpoint {path} is unreadable ({reason}); it may be truncated or not a checkpoint of this tool: "
            "use another one, e.g. an earlier step_NNNNNN.pt beside it",
            "unreadable: truncated, damaged or not a PyTorch file",
        ) from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED):
        raise Unreadable(
            f"{path} is a PyTorch file but not a checkpoint of this tool (it lacks {', '.join(REQUIRED)})",
            "a PyTorch file, but not a checkpoint of this tool",
        )
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise Unreadable(
            f"{path} was written by a newer version of this tool; upgrade the package to read it",
            f"written by a newer version (format {state['format_version']}, this one reads {FORMAT_VERSION})",
        )
    return state


def latest(directory: Path) -> Optional[Path]:
    """The newest loadable checkpoint in `directory`: last.pt, else the newest step file."""
    found, refusals = find_latest(directory)
    for refusal in refusals:
        log.warning("skipping %s in %s", refusal, directory)
    return found


def find_latest(directory: Path) -> Tuple[Optional[Path], List[str]]:
    """The newest loadable checkpoint (last.pt, else the newest step file), and why each newer file was refused."""
    candidates = [directory / LAST] + list(reversed(step_checkpoints(directory)))
    refusals = []
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            load(candidate)
        except Unreadable as error:
            refusals.append(f"{candidate.name} ({error.reason})")
            continue
        return candidate, refusals
    return None, refusals


# ---------------------------------------------------------------- resuming

# What a resume may change (docs/reliability.md). Refused: the settings that the saved tensors' shapes or
# the optimizers' state layout depend on. Not reported: how the run is driven, shown and stored. Any other
# change is allowed, logged as `key: old -> new` before training and recorded in the run card.
REFUSED_ON_RESUME = (
    "dataset.image_size",
    "dataset.attributes",  # CelebA's chosen attributes are a conditional run's classes
    "dataset.channels",
    "generator",
    "discriminator",
    "optimizer.generator.name",
    "optimizer.discriminator.name",
    "optimizer.generator.extra",
    "optimizer.discriminator.extra",
)
RUN_CONTROLS = tuple(
    f"trainer.{key}"
    for key in (
        "resume",
        "overwrite",
        "max_steps",
        "max_images",
        "epochs",
        "progress",
        "log_every",
        "sample_every",
        "ckpt_every",
        "ckpt_every_minutes",
        "max_minutes",
        "keep_last",
        "device",
        "dist_timeout_s",
        "grid_size",
        "compile",
        "cuda_graphs",
        "channels_last",
        "cudnn_benchmark",
        "fused_optimizer",
        "eval_every",
        "eval_every_minutes",
    )
) + ("logger", "eval", "sweep")

FREE_FORM = ("extra",)  # config sections whose keys are the user's, compared as one value


def changes_since(state: Dict[str, Any], current: DictConfig, path: Path) -> Dict[str, List[Any]]:
    """Settings that differ from the checkpoint's, as {key: [old, new]}; UserError for those a resume can't change."""
    before = _flat(OmegaConf.to_container(OmegaConf.create(state[CONFIG_YAML]), resolve=True))
    now = _flat(OmegaConf.to_container(current, resolve=True))
    # A key only one side has is a setting added to (or dropped from) the tool since: not a change.
    changed = {key: [before[key], now[key]] for key in before if key in now and before[key] != now[key]}
    if "conditional" in changed:  # checked with the others, before the run folder is touched
        raise conditional_changed(bool(changed["conditional"][0]))
    refused = [key for key in changed if _under(key, REFUSED_ON_RESUME)]
    if refused:
        listed = ", ".join(f"{key}={changed[key][0]} (now {changed[key][1]})" for key in refused)
        raise UserError(
            f"can't resume from {path}: it was trained with {listed}, and the saved weights or optimizer state only "
            "fit "
            "those; use the checkpoint's settings, or start a new run in another hydra.run.dir"
        )
    return {key: value for key, value in changed.items() if not _under(key, RUN_CONTROLS)}


def _flat(tree: Any, prefix: str = "") -> Dict[str, Any]:
    """{"a.b": value}; free-form sections (FREE_FORM, e.g. optimizer.generator.extra) stay whole values."""
    if not isinstance(tree, dict) or prefix.rsplit(".", 1)[-1] in FREE_FORM:
        return {prefix: tree}
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _under(key: str, prefixes: tuple) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)


def config_yaml(cfg: Any) -> str:
    """The resolved config as the checkpoint stores it (CONFIG_YAML), enough to rebuild the networks."""
    return OmegaConf.to_yaml(cfg, resolve=True)
