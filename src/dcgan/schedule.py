"""How far a run has come, and what follows from it: the end of the run by steps or by minutes, the
checkpoints and evaluations due by the clock, and the learning rates' linear decay over the run's last part.

A run ends at its step count or after `trainer.max_minutes` of training in this invocation, whichever
comes first (a cluster job's time slot: `trainer.resume=auto` continues it). Everything that follows
progress (the learning-rate decay here, `trainer.ema_start`, lazy R1) reads the run's step, which the
checkpoint stores, never this invocation's clock: a run cut into slots decays once, over its last steps,
exactly as the same run in one piece. The clock is read at log rows only, where the loop syncs anyway,
and under torchrun rank 0's reading is every rank's, so all ranks stop, checkpoint and evaluate at the
same step.

The clock counts training only: the time an evaluation takes (FID/KID, trainer.eval_every*) is left out
(`leave_out`), so `max_minutes`, the timed checkpoints and evaluations and every row's `minutes` read
the same whether or not a run is scored along the way.
"""

from __future__ import annotations

import time
from typing import Sequence, Tuple

import torch

from dcgan import distributed
from dcgan.optim import scale_learning_rates


class Schedule:
    def __init__(
        self,
        total_steps: int,
        max_minutes: float,
        ckpt_every_minutes: float,
        lr_decay: float,
        optimizers: Sequence[torch.optim.Optimizer],
        device: torch.device,
        eval_every_minutes: float = 0.0,
    ):
        """The trainer.* settings of the same names (0 turns each off); `optimizers` are the ones lr_decay scales."""
        self.total_steps, self.optimizers, self.device = total_steps, list(optimizers), device
        self.max_s, self.ckpt_every_s, self.decay = max_minutes * 60, ckpt_every_minutes * 60, lr_decay
        self.eval_every_s = eval_every_minutes * 60
        self.started = time.monotonic()
        self.left_out_s = 0.0  # evaluations: not training time
        self.elapsed_s = 0.0  # as of the last reading (rank 0's clock)
        self.next_ckpt_s = self.ckpt_every_s
        self.next_eval_s = self.eval_every_s
        self.out_of_time = False  # trainer.max_minutes ran out

    @property
    def minutes(self) -> float:
        return round(self.elapsed_s / 60, 4)

    def progress(self, step: int) -> float:
        """The fraction of the run done, by its steps (a slot's minutes say nothing of the whole run)."""
        return step / self.total_steps

    def set_learning_rates(self, step: int) -> None:
        """Before a step: each rate is its base rate x min(1, remaining fraction / trainer.lr_decay)."""
        if self.decay > 0:
            factor = min(1.0, max(0.0, 1.0 - self.progress(step)) / self.decay)
            for optimizer in self.optimizers:
                scale_learning_rates(optimizer, factor)

    def leave_out(self, seconds: float) -> None:
        """Time spent on something other than training (an evaluation), which the clock must not count."""
        self.left_out_s += seconds

    def read_clock(self) -> Tuple[bool, bool, bool]:
        """At a log row: (out of time, a timed checkpoint is due, a timed evaluation is due)."""
        self.elapsed_s = distributed.from_main(time.monotonic() - self.started - self.left_out_s, self.device)
        checkpoint_due, self.next_ckpt_s = self._due(self.ckpt_every_s, self.next_ckpt_s)
        evaluation_due, self.next_eval_s = self._due(self.eval_every_s, self.next_eval_s)
        self.out_of_time = bool(self.max_s) and self.elapsed_s >= self.max_s
        return self.out_of_time, checkpoint_due, evaluation_due

    def _due(self, every_s: float, next_s: float) -> Tuple[bool, float]:
        """Whether a timed event is due now, and when the next one is (times missed between readings are skipped)."""
        if not every_s or self.elapsed_s < next_s:
            return False, next_s
        return True, next_s + every_s * (1 + (self.elapsed_s - next_s) // every_s)
