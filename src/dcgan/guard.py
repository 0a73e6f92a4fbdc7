"""The health guard: notices, inside the training loop, a run that diverged or collapsed.

What it watches (thresholds in `trainer.health`, HealthConfig):

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

A fault ends train() with `Diverged`; what happens then (stop, or roll back) is supervise.py's job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch

from dcgan import distributed
from dcgan.errors import UserError, at_least, finite, unused


@dataclass
class HealthConfig:
    """The health guard's thresholds; the defaults never trip on a run that is learning."""

    collapse_steps: int = 1000  # a collapse signature must hold this many steps to count; 0 = watch NaN/Inf only
    collapse_d_accuracy: float = 0.99  # collapse: D's accuracy at or above this ...
    collapse_loss_g: float = 10.0  # ... while G's loss is at or above this (ns loss: D(G(z)) < 5e-5)
    min_diversity: float = 0.05  # or the fixed-noise grid varies less than this fraction of real images
    max_rollbacks: int = 3  # on_divergence=rollback: stop after this many rollbacks
    rollback_lr_factor: float = 0.5  # the k-th rollback trains on with both learning rates x factor**k


def validate_health(cfg: HealthConfig, on_divergence: str) -> None:
    if on_divergence not in ("stop", "rollback"):
        raise UserError(f"trainer.on_divergence must be one of stop, rollback; got {on_divergence!r}")
    for key in ("collapse_d_accuracy", "collapse_loss_g", "min_diversity", "rollback_lr_factor"):
        finite(f"trainer.health.{key}", cfg[key])
    at_least("trainer.health.collapse_steps", cfg.collapse_steps, 0)
    at_least("trainer.health.max_rollbacks", cfg.max_rollbacks, 0)
    if not 0.0 < cfg.rollback_lr_factor < 1.0:
        raise UserError(f"trainer.health.rollback_lr_factor must be in (0, 1), got {cfg.rollback_lr_factor}")
    if not 0.0 <= cfg.collapse_d_accuracy <= 1.0 or cfg.min_diversity < 0:
        raise UserError("trainer.health.collapse_d_accuracy must be in [0, 1] and trainer.health.min_diversity >= 0")
    if on_divergence == "stop":  # the rollback settings are read by a rollback only
        defaults = HealthConfig()
        for key in ("max_rollbacks", "rollback_lr_factor"):
            if cfg[key] != getattr(defaults, key):
                unused(
                    f"trainer.health.{key}",
                    cfg[key],
                    "trainer.on_divergence=stop never rolls back",
                    "add trainer.on_divergence=rollback",
                )


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

    since: Optional[int] = None  # the step of its first sighting in this streak; None: not seen at the last check
    last_good: int = 0  # the last check without it: the guard vouches for the run up to here

    def observe(self, step: int, seen: bool) -> Optional[int]:
        """Record a check; returns for how many steps the signature has held (None: it is absent)."""
        if not seen:
            self.since, self.last_good = None, step
            return None
        self.since = step if self.since is None else self.since
        return step - self.since


class Diverged(Exception):
    """Raised by train() after a fault; supervise.py stops or rolls back."""

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
    def watch(self, name: str, loss: torch.Tensor, model: Optional[torch.nn.Module]) -> None:
        """After `loss.backward()`: note whether the loss and `model`'s gradient are finite (no sync).

        `model=None` watches the loss only: fp16's scaled gradients overflow now and then by design.
        """
        watched = [(f"{name}'s loss", loss.detach())]
        if model is not None:
            gradients = [p.grad for p in model.parameters() if p.grad is not None]
            watched.append((f"{name}'s gradient", torch.nn.utils.get_total_norm(gradients, error_if_nonfinite=False)))
        for what, value in watched:
            finite = torch.isfinite(value).all()
            # In place once the flag exists: a replayed CUDA graph writes into the tensor read at the next check.
            if what in self._finite:
                self._finite[what].logical_and_(finite)
            else:
                self._finite[what] = finite.clone()

    def check_row(self, step: int, row: Dict[str, Any]) -> None:
        """At a log row: read the non-finite flags and look for the collapse signature."""
        self._check_finite(step)
        c = self.cfg
        if c.collapse_steps > 0 and "d_accuracy" in row and "loss_g" in row:
            d_wins = row["d_accuracy"] >= c.collapse_d_accuracy and row["loss_g"] >= c.collapse_loss_g
            self._watch(
                self.collapse_streak,
                "collapse",
                step,
                d_wins,
                lambda held: (
                    f"D has won outright since step {self.collapse_streak.since}: D's accuracy >= "
                    f"{c.collapse_d_accuracy:g} and G's loss >= {c.collapse_loss_g:g} at every log row "
                    f"for {held} steps "
                    f"(now {row['d_accuracy']:.3f} and {row['loss_g']:.3g})"
                ),
            )
        self._agree(step)

    def check_grid(self, step: int, images: torch.Tensor) -> None:
        """When a fixed-noise grid is drawn (images in [-1, 1]): has G stopped varying its output?"""
        self.grid_diversity = value = diversity(images)
        c = self.cfg
        if c.collapse_steps > 0 and c.min_diversity > 0 and value == value:  # (NaN: a grid of one image)
            uniform = value < c.min_diversity * self.reference_diversity
            self._watch(
                self.diversity_streak,
                "diversity",
                step,
                uniform,
                lambda held: (
                    f"the fixed-noise grid has lost its diversity since step {self.diversity_streak.since}: "
                    "mean pairwise "
                    f"distance {value:.4f}, below {c.min_diversity:g} x that of real images "
                    f"({self.reference_diversity:.3f}), for {held} steps"
                ),
            )

    def healthy(self, step: int, state: Any) -> bool:
        """Before a checkpoint write: may `state` (a state.TrainingState) be saved? (reads the flags: a GPU sync)

        Besides the flags, every floating tensor about to be saved is checked: the last update can
        turn weights or Adam's second moments Inf from finite gradients (1e20 squared overflows).
        """
        self._check_finite(step, saved_state_flags(state, self.device))
        self._agree(step)
        return self.fault is None

    @property
    def trusted_step(self) -> int:
        """The newest step the guard vouches for; `checkpoint.save` never prunes the last checkpoint up to it."""
        streaks = (self.collapse_streak, self.diversity_streak)
        return min([self.checked_step] + [s.last_good for s in streaks if s.since is not None])

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
        """Read the flags; `saved_state` adds those of the state about to be saved, last read at state_checked_step."""
        flags = {name: (flag, self.checked_step) for name, flag in self._finite.items()}
        flags.update({name: (flag, self.state_checked_step) for name, flag in (saved_state or {}).items()})
        if self._found is None and flags:
            names = list(flags)
            finite = torch.stack([flags[n][0].to(self.device) for n in names]).tolist()  # a CPU-GPU sync point
            bad = [name for name, ok in zip(names, finite, strict=True) if not ok]
            if bad:
                since = min(flags[name][1] for name in bad)
                listed = ", ".join(bad[:-1]) + " and " + bad[-1] if len(bad) > 1 else bad[0]
                message = f"NaN or Inf in {listed} between steps {since} and {step}"
                self._found = Fault("non-finite", step, message, since)
        for flag in self._finite.values():
            flag.fill_(True)  # in place (see watch); the next check covers the steps from here on
        if self._found is None:
            self.checked_step = step
            if saved_state is not None:
                self.state_checked_step = step

    def _agree(self, step: int) -> None:
        """Make a fault found on one rank everyone's (only rank 0 draws grids), so all leave the loop together."""
        if self.fault is not None:
            return
        if distributed.any_rank(self._found is not None, self.device):
            elsewhere = Fault("another rank", step, "another process of the job found a fault", self.checked_step)
            self.fault = self._found or elsewhere

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
        # D winning outright (at log rows), a uniform grid (at grids)
        self.collapse_streak = Streak(**state.get("collapse_streak", {"last_good": step}))
        self.diversity_streak = Streak(**state.get("diversity_streak", {"last_good": step}))
        self.checked_step = self.state_checked_step = step  # a checkpoint is only written after both checks


def saved_state_flags(state: Any, device: torch.device) -> Dict[str, torch.Tensor]:
    """Whether each network's weights and buffers, and each optimizer's state, are all finite (bools on `device`).

    `state` is a state.TrainingState (that module builds on this one, so it is not named here).
    Adam keeps its step counts on the CPU even for CUDA weights; their flags are copied over.
    """
    groups = {
        "G's weights": state.G.state_dict(),
        "D's weights": state.D.state_dict(),
        "the EMA generator": state.G_ema.model.state_dict() if state.G_ema is not None else {},
        "G's optimizer state": state.opt_g.state,
        "D's optimizer state": state.opt_d.state,
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
