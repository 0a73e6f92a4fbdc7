"""What a divergence does: `supervise` runs train() and, when the guard (guard.py) ends it, stops or rolls back.

`trainer.on_divergence`:
  stop      last.pt becomes the last healthy checkpoint, suspect ones move to checkpoints/suspect/
            (nothing is deleted), the fault is reported (DivergedAndStopped: gan-train exits with
            errors.DIVERGED_EXIT).
  rollback  the same, and the healthy state is rewritten as last.pt with both learning rates set
            to lr * rollback_lr_factor**k for the k-th rollback; training then resumes from it. A
            fault before the run got past the previous one goes back one checkpoint further. After
            max_rollbacks rollbacks, or with no healthy checkpoint left, it stops as above.
"""

from __future__ import annotations

import copy
import errno
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch.distributed as dist
from omegaconf import DictConfig

from dcgan import checkpoint, distributed, runcard, state
from dcgan.errors import Interrupted, UserError
from dcgan.guard import Diverged, Fault
from dcgan.layout import RunFolder

log = logging.getLogger(__name__)


class DivergedAndStopped(Exception):
    """The run diverged and is not rolled back (any more); the message is the report for the user."""


def supervise(train_fn: Callable[[DictConfig, Path], Dict[str, Any]], cfg: DictConfig, run_dir: Path) -> Dict[str, Any]:
    """Run `train_fn(cfg, run_dir)`; on a divergence roll back or raise DivergedAndStopped (`trainer.on_divergence`).

    A second stop signal (Interrupted) leaves the run card `interrupted`, as the first does. Also turns an
    OSError (a full disk, a read-only or vanished folder) into a UserError naming the
    path: checkpoints are written atomically, so the ones already there are intact.
    """
    while True:
        try:
            return train_fn(cfg, run_dir)
        except Diverged as diverged:
            cfg = recover(diverged, cfg, run_dir)
        except UserError as error:
            runcard.update(run_dir, status="failed", error=str(error))
            raise
        except Interrupted as interrupted:  # a second signal: now, from wherever it came (a step, the figures)
            runcard.update(run_dir, status="interrupted", signal=interrupted.signal)
            raise
        except OSError as error:
            message = describe_os_error(error)
            runcard.update(run_dir, status="failed", error=message)
            raise UserError(message) from None


def describe_os_error(error: OSError) -> str:
    where = error.filename or "a file of the run"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "free some disk space or point hydra.run.dir at another disk"
    else:
        advice = "check that path and its permissions, or point hydra.run.dir elsewhere"
    return (
        f"{error.strerror or error}: {where}; {advice}. "
        "Checkpoints written so far are intact: continue with trainer.resume=auto"
    )


def recover(diverged: Diverged, cfg: DictConfig, run_dir: Path) -> DictConfig:
    """Roll back and return the config to train on with, or raise DivergedAndStopped with the report."""
    fault, memory, t, run = diverged.fault, diverged.guard_state, cfg.trainer, RunFolder(run_dir)
    target = healthy_checkpoint(run.checkpoints, fault, memory)
    barrier()  # every rank has chosen from the same files before rank 0 moves any
    rolling_back = t.on_divergence == "rollback" and target is not None and memory["rollbacks"] < t.health.max_rollbacks
    rollbacks = memory["rollbacks"] + 1 if rolling_back else memory["rollbacks"]
    target_step = checkpoint.step_of(target) if target is not None else None
    moved: List[Path] = []
    if target is not None and distributed.world().is_main:
        moved = retreat(run, target, rolled_back_state(target, cfg, fault, rollbacks) if rolling_back else None)
    barrier()  # the other ranks resume from last.pt only once rank 0 has rewritten it
    if rolling_back:
        factor = t.health.rollback_lr_factor**rollbacks
        action = (
            f"rolled back to step {target_step} with learning rates x{factor:g} "
            f"(rollback {rollbacks} of {t.health.max_rollbacks})"
        )
        log.error("diverged at step %d: %s; %s", fault.step, fault.message, action)
        runcard.update(run_dir, action=action)
        retry = copy.deepcopy(cfg)
        retry.trainer.resume = "auto"
        return retry
    report = stop_report(fault, t, run, target, target_step, moved, rollbacks)
    runcard.update(run_dir, action=report, healthy_checkpoint=str(target) if target else None)
    raise DivergedAndStopped(report)


def barrier() -> None:
    if distributed.world().enabled:
        dist.barrier()


def healthy_checkpoint(checkpoints: Path, fault: Fault, memory: Dict[str, Any]) -> Optional[Path]:
    """The newest loadable step checkpoint at or before the fault's trusted step (`memory`: the guard's state dict).

    If the run failed again before getting past the previous fault, the checkpoint it was rolled
    back to was not far enough back: go further.
    """
    bound = fault.trusted_step
    if memory.get("last_fault_step") is not None and fault.trusted_step <= memory["last_fault_step"]:
        bound = min(bound, memory["rolled_back_to"] - 1)
    for path in reversed(checkpoint.step_checkpoints(checkpoints)):
        if checkpoint.step_of(path) <= bound:
            try:
                checkpoint.load(path)
            except UserError as error:
                log.warning("skipping %s: %s", path, error)
                continue
            return path
    return None


def rolled_back_state(target: Path, cfg: DictConfig, fault: Fault, rollbacks: int) -> Dict[str, Any]:
    """The healthy checkpoint, with lowered learning rates and the guard's memory of this rollback."""
    saved = checkpoint.load(target)
    factor = cfg.trainer.health.rollback_lr_factor**rollbacks
    for part, key in state.OPTIMIZERS.items():
        state.set_learning_rate(saved[key], cfg.optimizer[part].lr * factor)
    memory = saved.get(state.HEALTH) or {}
    saved[state.HEALTH] = {
        **memory,
        "rollbacks": rollbacks,
        "last_fault_step": fault.step,
        "rolled_back_to": saved[state.STEP],
    }
    # This run's config, so that resuming sees no learning rate "changed since the checkpoint".
    saved[state.CONFIG_YAML] = checkpoint.config_yaml(cfg)
    return saved


def retreat(run: RunFolder, target: Path, new_last: Optional[Dict[str, Any]]) -> List[Path]:
    """Make `target` (or `new_last`, a changed copy of it) last.pt and move newer step files to run.suspect.

    last.pt is replaced first, atomically: a kill in between leaves suspect step files beside a
    healthy last.pt, which `latest()` prefers. Returns where the suspect files went.
    """
    target_step = checkpoint.step_of(target)
    suspect = [p for p in checkpoint.step_checkpoints(run.checkpoints) if checkpoint.step_of(p) > target_step]
    if new_last is not None or suspect:
        checkpoint.save_as(new_last or checkpoint.load(target), run.checkpoints / checkpoint.LAST)
    moved = []
    for path in suspect:
        run.suspect.mkdir(exist_ok=True)
        moved.append(path.replace(run.suspect / path.name))
    return moved


def stop_report(
    fault: Fault,
    t: DictConfig,
    run: RunFolder,
    target: Optional[Path],
    target_step: Optional[int],
    moved: List[Path],
    rollbacks: int,
) -> str:
    parts = [f"at step {fault.step}, {fault.message}."]
    if rollbacks:
        parts.append(f"{rollbacks} rollback(s) did not help (trainer.health.max_rollbacks={t.health.max_rollbacks}).")
    if target is None:
        parts.append(
            f"No healthy checkpoint is left (none at or before step {fault.trusted_step}); "
            "start again with lower learning rates."
        )
    else:
        aside = f"; {len(moved)} later checkpoint(s) moved to {run.suspect}" if moved else ""
        parts.append(
            f"Last healthy checkpoint: {target} (step {target_step}), which last.pt now holds{aside}. "
            "To continue, lower "
            "optimizer.generator.lr / optimizer.discriminator.lr and run the same command with trainer.resume=auto, "
            "or use trainer.on_divergence=rollback."
        )
    parts.append(f"Details in {run.card}.")
    return " ".join(parts)
