"""The health guard: notices a run that diverged or collapsed, and stops it or rolls it back.

What it watches (thresholds in `trainer.health`, config.HealthConfig):

  non-finite  After every backward pass, `watch` folds isfinite(loss) and isfinite(total gradient
              norm) into flags that stay on the device, so a step costs a few tiny kernels and no
              GPU sync. The flags are read at each log row (a sync the metrics already pay) and
              before every checkpoint write, so no checkpoint is ever written from NaN weights.
  collapse    D wins outright: a log row with D's accuracy >= collapse_d_accuracy and G's loss
              >= collapse_loss_g, at every row for collapse_steps steps.
  diversity   The fixed-noise grid's mean pairwise distance below min_diversity times that of
              real training images, at every grid for collapse_steps steps. Real images are the
              yardstick, not the first grid: early grids come from a G whose BatchNorm running
              statistics are still warming up, and look far less varied than G really is.

Which checkpoints are healthy. Each signal keeps the step up to which it vouches for the run:
the last clean non-finite check (a NaN found at step S happened after the previous check P; as
every checkpoint write is preceded by a check, no checkpoint exists between P and S), the last
log row before a collapse streak began, the last varied grid before a low-diversity streak began.
`trusted_step` is the smallest of them. Checkpoints after the trusted step of a fault are
*suspect*: a collapse is only declared after it has held for a while, and the checkpoints written
meanwhile already hold the collapsed networks. Pruning (`trainer.keep_last`) always spares the
newest checkpoint at or before the trusted step, so a healthy one is there to go back to.

What a fault does (`trainer.on_divergence`, applied by `supervise` around `train`):
  stop      last.pt becomes the last healthy checkpoint, suspect ones move to checkpoints/suspect/
            (nothing is deleted), the fault is reported and gan-train exits with DIVERGED_EXIT_CODE.
  rollback  the same, and the healthy state is rewritten as last.pt with both learning rates set
            to lr * rollback_lr_factor**k for the k-th rollback; training then resumes from it. A
            fault before the run got past the previous one goes back one checkpoint further. After
            max_rollbacks rollbacks, or with no healthy checkpoint left, it stops as above.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from dcgan import checkpoint, distributed, runcard
from dcgan.errors import DIVERGED_EXIT, UserError, at_least


@dataclass
class HealthConfig:
    """The health guard's thresholds (health.py); the defaults never trip on a run that is learning."""

    collapse_steps: int = 1000  # a collapse signature must hold this many steps to count; 0 = watch NaN/Inf only
    collapse_d_accuracy: float = 0.99  # collapse: D's accuracy at or above this ...
    collapse_loss_g: float = 10.0  # ... while G's loss is at or above this (ns loss: D(G(z)) < 5e-5)
    min_diversity: float = 0.05  # or the fixed-noise grid varies less than this fraction of real images
    max_rollbacks: int = 3  # on_divergence=rollback: stop after this many rollbacks
    rollback_lr_factor: float = 0.5  # the k-th rollback trains on with both learning rates x factor**k


def validate_health(cfg: HealthConfig, on_divergence: str) -> None:
    if on_divergence not in ("stop", "rollback"):
        raise UserError(f"trainer.on_divergence must be one of stop, rollback; got {on_divergence!r}")
    at_least("trainer.health.collapse_steps", cfg.collapse_steps, 0)
    at_least("trainer.health.max_rollbacks", cfg.max_rollbacks, 0)
    if not 0.0 < cfg.rollback_lr_factor < 1.0:
        raise UserError(f"trainer.health.rollback_lr_factor must be in (0, 1), got {cfg.rollback_lr_factor}")
    if not 0.0 <= cfg.collapse_d_accuracy <= 1.0 or cfg.min_diversity < 0:
        raise UserError("trainer.health.collapse_d_accuracy must be in [0, 1] and trainer.health.min_diversity >= 0")

log = logging.getLogger(__name__)

# gan-train's exit code when training diverged (2 is a usage error, 128 + N a stop by signal N).
DIVERGED_EXIT_CODE = DIVERGED_EXIT
SUSPECT_FOLDER = "suspect"
REFERENCE_IMAGES = 64  # real images whose diversity the grids are measured against


@dataclass
class Fault:
    kind: str  # non-finite | collapse | diversity | another rank (under torchrun)
    step: int  # where the guard found it
    message: str  # what it saw, as a sentence
    trusted_step: int  # checkpoints after this step are suspect


@dataclass
class Streak:
    """How long a collapse signature has held at consecutive checks (log rows, or grids)."""

    since: Optional[int] = None  # the step of its first sighting in the current streak; None: not seen at the last check
    last_good: int = 0  # the last check without it: the guard vouches for the run up to here

    def observe(self, step: int, seen: bool) -> Optional[int]:
        """Record a check; returns for how many steps the signature has held (None: it is absent)."""
        if not seen:
            self.since, self.last_good = None, step
            return None
        self.since = step if self.since is None else self.since
        return step - self.since


class Diverged(Exception):
    """Raised by train() after a fault; `supervise` stops or rolls back."""

    def __init__(self, fault: Fault, guard_state: Dict[str, Any]):
        super().__init__(fault.message)
        self.fault, self.guard_state = fault, guard_state


def diversity(images: torch.Tensor) -> float:
    """Mean pairwise RMS pixel distance of images in [-1, 1]; 0 when all are identical (a CPU-GPU sync)."""
    flat = images.detach().float().flatten(1)
    return float(torch.pdist(flat).mean() / flat.shape[1] ** 0.5) if len(flat) > 1 else float("nan")


def real_diversity(images: torch.Tensor) -> float:
    """`diversity` of a fixed random sample of the uint8 training images."""
    picked = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:REFERENCE_IMAGES]
    return diversity(images[picked.sort().values].float() / 127.5 - 1)


class Guard:
    """Watches one training run (see the module docstring); its memory goes into every checkpoint."""

    def __init__(self, cfg: HealthConfig, real_images: torch.Tensor, device: torch.device):
        self.cfg, self.device = cfg, device
        self.reference_diversity = real_diversity(real_images)
        self.grid_diversity: Optional[float] = None
        self._finite: Dict[str, torch.Tensor] = {}  # "D's loss" -> device bool: all finite since the last check
        self._found: Optional[Fault] = None  # seen here, not yet agreed between ranks
        self.fault: Optional[Fault] = None
        self.load_state_dict({}, step=0)

    # ------------------------------------------------------------ what the loop calls

    @torch.no_grad()
    def watch(self, name: str, loss: torch.Tensor, model: torch.nn.Module) -> None:
        """After `loss.backward()`: note whether the loss and `model`'s gradient are finite (no sync)."""
        gradients = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(gradients, error_if_nonfinite=False)
        for what, value in ((f"{name}'s loss", loss.detach()), (f"{name}'s gradient", norm)):
            finite = torch.isfinite(value).all()
            self._finite[what] = self._finite[what] & finite if what in self._finite else finite

    def check_row(self, step: int, row: Dict[str, Any]) -> None:
        """At a log row: read the non-finite flags and look for the collapse signature."""
        self._check_finite(step)
        c = self.cfg
        if c.collapse_steps > 0 and "d_accuracy" in row and "loss_g" in row:
            d_wins = row["d_accuracy"] >= c.collapse_d_accuracy and row["loss_g"] >= c.collapse_loss_g
            self._watch(self.collapse_streak, "collapse", step, d_wins, lambda held: (
                f"D has won outright since step {self.collapse_streak.since}: D's accuracy >= {c.collapse_d_accuracy:g} and G's loss "
                f">= {c.collapse_loss_g:g} at every log row for {held} steps (now {row['d_accuracy']:.3f} and {row['loss_g']:.3g})"
            ))
        self._agree(step)

    def check_grid(self, step: int, images: torch.Tensor) -> None:
        """When a fixed-noise grid is drawn (images in [-1, 1]): has G stopped varying its output?"""
        self.grid_diversity = value = diversity(images)
        c = self.cfg
        if c.collapse_steps > 0 and c.min_diversity > 0 and value == value:  # (NaN: a grid of one image)
            uniform = value < c.min_diversity * self.reference_diversity
            self._watch(self.diversity_streak, "diversity", step, uniform, lambda held: (
                f"the fixed-noise grid has lost its diversity since step {self.diversity_streak.since}: mean pairwise distance "
                f"{value:.4f}, below {c.min_diversity:g} x that of real images ({self.reference_diversity:.3f}), for {held} steps"
            ))

    def healthy(self, step: int, parts: Dict[str, Any]) -> bool:
        """Before a checkpoint write: may this state be saved? (reads the flags: a CPU-GPU sync point)

        Besides the flags, every floating tensor about to be saved is checked: the last update can
        turn weights or Adam's second moments Inf from finite gradients (1e20 squared overflows).
        """
        self._check_finite(step, saved_state_flags(parts, self.device))
        self._agree(step)
        return self.fault is None

    @property
    def trusted_step(self) -> int:
        """The newest step the guard vouches for; `checkpoint.save` never prunes the last checkpoint up to it."""
        return min([self.checked_step] + [s.last_good for s in (self.collapse_streak, self.diversity_streak) if s.since is not None])

    def raise_if_diverged(self) -> None:
        if self.fault is not None:
            raise Diverged(self.fault, self.state_dict())

    def summary(self) -> Dict[str, Any]:
        """For the run card."""
        return {
            "fault": dataclasses.asdict(self.fault) if self.fault else None,
            "rollbacks": self.rollbacks,
            "grid_diversity": self.grid_diversity,
            "real_image_diversity": self.reference_diversity,
        }

    # ------------------------------------------------------------ internals and checkpoint state

    def _watch(self, streak: Streak, kind: str, step: int, seen: bool, describe: Callable[[int], str]) -> None:
        """A collapse signature counts once it has held at every check for collapse_steps steps."""
        held = streak.observe(step, seen)
        if self._found is None and held is not None and held >= self.cfg.collapse_steps:
            self._found = Fault(kind, step, describe(held), streak.last_good)

    def _check_finite(self, step: int, saved_state: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Read the flags; `saved_state` adds those of the state about to be checkpointed, last read at state_checked_step."""
        flags = {name: (flag, self.checked_step) for name, flag in self._finite.items()}
        flags.update({name: (flag, self.state_checked_step) for name, flag in (saved_state or {}).items()})
        if self._found is None and flags:
            names = list(flags)
            finite = torch.stack([flags[n][0].to(self.device) for n in names]).tolist()  # a CPU-GPU sync point
            bad = [name for name, ok in zip(names, finite) if not ok]
            if bad:
                since = min(flags[name][1] for name in bad)
                listed = ", ".join(bad[:-1]) + " and " + bad[-1] if len(bad) > 1 else bad[0]
                self._found = Fault("non-finite", step, f"NaN or Inf in {listed} between steps {since} and {step}", since)
        self._finite = {}
        if self._found is None:
            self.checked_step = step
            if saved_state is not None:
                self.state_checked_step = step

    def _agree(self, step: int) -> None:
        """Make a fault found on one rank everyone's (only rank 0 draws grids), so all leave the loop together."""
        if self.fault is not None:
            return
        if distributed.any_rank(self._found is not None, self.device):
            self.fault = self._found or Fault("another rank", step, "another process of the job found a fault", self.checked_step)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "rollbacks": self.rollbacks,
            "last_fault_step": self.last_fault_step,
            "rolled_back_to": self.rolled_back_to,
            "collapse_streak": dataclasses.asdict(self.collapse_streak),
            "diversity_streak": dataclasses.asdict(self.diversity_streak),
        }

    def load_state_dict(self, state: Dict[str, Any], step: int) -> None:
        """The guard's memory at a checkpoint of step `step` (an empty dict: a fresh run, or an older checkpoint)."""
        self.rollbacks: int = state.get("rollbacks", 0)
        self.last_fault_step: Optional[int] = state.get("last_fault_step")
        self.rolled_back_to: Optional[int] = state.get("rolled_back_to")
        self.collapse_streak = Streak(**state.get("collapse_streak", {"last_good": step}))  # D winning outright, at log rows
        self.diversity_streak = Streak(**state.get("diversity_streak", {"last_good": step}))  # a uniform grid, at grids
        self.checked_step = self.state_checked_step = step  # a checkpoint is only written after both checks


def saved_state_flags(parts: Dict[str, Any], device: torch.device) -> Dict[str, torch.Tensor]:
    """Whether each network's weights and buffers, and each optimizer's state, are all finite (bools on `device`).

    Adam keeps its step counts on the CPU even for CUDA weights; their flags are copied over.
    """
    groups = {
        "G's weights": parts["G"].state_dict(),
        "D's weights": parts["D"].state_dict(),
        "the EMA generator": parts["G_ema"].model.state_dict() if parts["G_ema"] is not None else {},
        "G's optimizer state": parts["opt_g"].state,
        "D's optimizer state": parts["opt_d"].state,
    }
    flags = {}
    for name, group in groups.items():
        floating = [t for t in tensors_in(group) if t.is_floating_point()]
        if floating:
            flags[name] = torch.stack([t.isfinite().all().to(device) for t in floating]).all()
    return flags


def tensors_in(value: Any):
    """Every tensor in nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        yield from (t for item in value.values() for t in tensors_in(item))
    elif isinstance(value, (list, tuple)):
        yield from (t for item in value for t in tensors_in(item))


# ---------------------------------------------------------------- resuming


def on_resume(state: Dict[str, Any], cfg: DictConfig, parts: Dict[str, Any]) -> None:
    """After train.resume loaded a checkpoint: restore the guard, apply learning rates changed since.

    The optimizers' state dicts carry their learning rates, so without this a resume would silently
    keep the old rate even when the user lowered it on the command line after a divergence. A rate
    equal to the checkpoint's config keeps the optimizer's own (which a rollback may have lowered).
    """
    parts["guard"].load_state_dict(state.get("health") or {}, int(state["step"]))
    saved = OmegaConf.create(state["config_yaml"])
    for part, optimizer in (("generator", parts["opt_g"]), ("discriminator", parts["opt_d"])):
        before, now = OmegaConf.select(saved, f"optimizer.{part}.lr"), cfg.optimizer[part].lr
        if before != now:
            log.info("optimizer.%s.lr is %g in this run, %g in the checkpoint: continuing with %g", part, now, before, now)
            set_learning_rate(optimizer, now)


def set_learning_rate(optimizer: torch.optim.Optimizer | Dict[str, Any], lr: float) -> None:
    """On an optimizer or on its state dict."""
    groups = optimizer["param_groups"] if isinstance(optimizer, dict) else optimizer.param_groups
    for group in groups:
        group["lr"] = lr


# ---------------------------------------------------------------- stop or roll back


def supervise(train_fn: Callable[[DictConfig, Path], Dict[str, Any]], cfg: DictConfig, run_dir: Path) -> Dict[str, Any]:
    """Run `train_fn(cfg, run_dir)`; on a divergence stop or roll back (`trainer.on_divergence`).

    Also turns an OSError (a full disk, a read-only or vanished folder) into a UserError naming the
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
    return f"{error.strerror or error}: {where}; {advice}. Checkpoints written so far are intact: continue with trainer.resume=auto"


def recover(diverged: Diverged, cfg: DictConfig, run_dir: Path) -> DictConfig:
    """Roll back and return the config to train on with, or report the fault and exit DIVERGED_EXIT_CODE."""
    fault, state, t = diverged.fault, diverged.guard_state, cfg.trainer
    checkpoints = run_dir / "checkpoints"
    target = healthy_checkpoint(checkpoints, fault, state)
    barrier()  # every rank has chosen from the same files before rank 0 moves any
    rolling_back = t.on_divergence == "rollback" and target is not None and state["rollbacks"] < t.health.max_rollbacks
    rollbacks = state["rollbacks"] + 1 if rolling_back else state["rollbacks"]
    target_step = checkpoint.step_of(target) if target is not None else None
    moved: List[Path] = []
    if target is not None and distributed.world().is_main:
        moved = retreat(checkpoints, target, rolled_back_state(target, cfg, fault, rollbacks) if rolling_back else None)
    barrier()  # the other ranks resume from last.pt only once rank 0 has rewritten it
    if rolling_back:
        factor = t.health.rollback_lr_factor**rollbacks
        action = f"rolled back to step {target_step} with learning rates x{factor:g} (rollback {rollbacks} of {t.health.max_rollbacks})"
        log.error("diverged at step %d: %s; %s", fault.step, fault.message, action)
        runcard.update(run_dir, action=action)
        retry = copy.deepcopy(cfg)
        retry.trainer.resume = "auto"
        return retry
    report = stop_report(fault, t, run_dir, target, target_step, moved, rollbacks)
    runcard.update(run_dir, action=report, healthy_checkpoint=str(target) if target else None)
    if distributed.world().is_main:
        print(f"gan-train: diverged: {report}", file=sys.stderr)
    raise SystemExit(DIVERGED_EXIT_CODE)


def barrier() -> None:
    if distributed.world().enabled:
        dist.barrier()


def healthy_checkpoint(checkpoints: Path, fault: Fault, state: Dict[str, Any]) -> Optional[Path]:
    """The newest loadable step checkpoint at or before the fault's trusted step.

    If the run failed again before getting past the previous fault, the checkpoint it was rolled
    back to was not far enough back: go further.
    """
    bound = fault.trusted_step
    if state.get("last_fault_step") is not None and fault.trusted_step <= state["last_fault_step"]:
        bound = min(bound, state["rolled_back_to"] - 1)
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
    state = checkpoint.load(target)
    factor = cfg.trainer.health.rollback_lr_factor**rollbacks
    for key, part in (("optimizer_g", "generator"), ("optimizer_d", "discriminator")):
        set_learning_rate(state[key], cfg.optimizer[part].lr * factor)
    state["health"] = {**(state.get("health") or {}), "rollbacks": rollbacks, "last_fault_step": fault.step, "rolled_back_to": state["step"]}
    # This run's config, so that resuming sees no learning rate "changed since the checkpoint" (on_resume).
    state["config_yaml"] = checkpoint.config_yaml(cfg)
    return state


def retreat(checkpoints: Path, target: Path, new_last: Optional[Dict[str, Any]]) -> List[Path]:
    """Make `target` (or `new_last`, a changed copy of it) last.pt and move newer step files aside.

    last.pt is replaced first, atomically: a kill in between leaves suspect step files beside a
    healthy last.pt, which `latest()` prefers. Returns where the suspect files went.
    """
    target_step = checkpoint.step_of(target)
    suspect = [p for p in checkpoint.step_checkpoints(checkpoints) if checkpoint.step_of(p) > target_step]
    if new_last is not None or suspect:
        checkpoint.save_as(new_last or checkpoint.load(target), checkpoints / checkpoint.LAST)
    moved = []
    for path in suspect:
        (checkpoints / SUSPECT_FOLDER).mkdir(exist_ok=True)
        moved.append(path.replace(checkpoints / SUSPECT_FOLDER / path.name))
    return moved


def stop_report(fault: Fault, t: DictConfig, run_dir: Path, target: Optional[Path], target_step: Optional[int], moved: List[Path], rollbacks: int) -> str:
    parts = [f"at step {fault.step}, {fault.message}."]
    if rollbacks:
        parts.append(f"{rollbacks} rollback(s) did not help (trainer.health.max_rollbacks={t.health.max_rollbacks}).")
    if target is None:
        parts.append(f"No healthy checkpoint is left (none at or before step {fault.trusted_step}); start again with lower learning rates.")
    else:
        aside = f"; {len(moved)} later checkpoint(s) moved to {target.parent / SUSPECT_FOLDER}" if moved else ""
        parts.append(
            f"Last healthy checkpoint: {target} (step {target_step}), which last.pt now holds{aside}. To continue, lower "
            "optimizer.generator.lr / optimizer.discriminator.lr and run the same command with trainer.resume=auto, "
            "or use trainer.on_divergence=rollback."
        )
    parts.append(f"Details in {run_dir / runcard.CARD}.")
    return " ".join(parts)
