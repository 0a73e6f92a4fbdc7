"""Optimizers from config, and the exponential moving average of the generator."""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List

import torch
from torch import nn

from dcgan.errors import UserError, finite, unused


@dataclass
class OptimizerSettings:
    name: str = "Adam"  # any class in torch.optim
    lr: float = 2e-4
    betas: List[float] = field(default_factory=lambda: [0.5, 0.999])  # for optimizers that take betas
    weight_decay: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)  # further keyword arguments, e.g. {momentum: 0.9}


@dataclass
class OptimizerConfig:
    generator: OptimizerSettings = field(default_factory=OptimizerSettings)
    discriminator: OptimizerSettings = field(default_factory=OptimizerSettings)


def build_optimizer(
    params, settings: OptimizerSettings, key: str, fused: bool = False, capturable: bool = False
) -> torch.optim.Optimizer:
    """Any torch.optim class by name; `betas` go only to optimizers that take them.

    `key` (e.g. "optimizer.generator") names the config section in error messages. `fused`
    (trainer.fused_optimizer) asks for the single-kernel update where the class has one (Adam,
    AdamW, SGD, Adagrad), unless `extra` already picks an implementation (fused or foreach).
    """
    cls = getattr(torch.optim, settings.name, None)
    if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
        raise UserError(f"{key}.name={settings.name!r} is not a torch.optim optimizer (e.g. Adam, AdamW, RMSprop, SGD)")
    accepted = inspect.signature(cls).parameters
    kwargs = {"lr": settings.lr, "weight_decay": settings.weight_decay}
    if "betas" in accepted:
        kwargs["betas"] = tuple(settings.betas)
    kwargs.update(dict(settings.extra))
    if fused and "fused" in accepted and not {"fused", "foreach"} & set(kwargs):
        kwargs["fused"] = True
    if capturable and "capturable" in accepted:  # step counts on the device: the update can run inside a CUDA graph
        kwargs["capturable"] = True
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise UserError(
            f"{key}: torch.optim.{settings.name} takes no argument {', '.join(unknown)}; remove it from {key}"
        )
    try:
        optimizer = cls(params, **kwargs)
    except (TypeError, ValueError) as error:
        raise UserError(f"{key}: torch.optim.{settings.name} rejected its settings: {error}") from None
    for group in optimizer.param_groups:
        group[BASE_LR] = group["lr"]
    return optimizer


# The learning rate before trainer.lr_decay scales it, kept in each parameter group (and so in checkpoints):
# a resumed run decays from it, not from the already-decayed "lr" it finds.
BASE_LR = "base_lr"


def scale_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every group's learning rate := its base rate x factor (trainer.lr_decay's schedule)."""
    for group in optimizer.param_groups:
        group["lr"] = group[BASE_LR] * factor


def validate_optimizers(cfg: OptimizerConfig) -> None:
    for part in ("generator", "discriminator"):
        settings = cfg[part]
        finite(f"optimizer.{part}.lr", settings.lr)
        finite(f"optimizer.{part}.weight_decay", settings.weight_decay)
        if not settings.lr > 0:
            raise UserError(f"optimizer.{part}.lr must be > 0, got {settings.lr}")
        if len(settings.betas) != 2 or not all(0.0 <= b < 1.0 for b in settings.betas):
            raise UserError(f"optimizer.{part}.betas must be two numbers in [0, 1), got {list(settings.betas)}")
        if settings.weight_decay < 0:
            raise UserError(f"optimizer.{part}.weight_decay must be >= 0, got {settings.weight_decay}")
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], settings, f"optimizer.{part}")  # name and arguments exist
        check_betas_used(settings, f"optimizer.{part}")


def check_betas_used(settings: OptimizerSettings, key: str) -> None:
    """Betas other than the default given to an optimizer without them (RMSprop, SGD) would be dropped silently.

    The default pair stays accepted: the optimizer files set it, and `optimizer.generator.name=SGD` over
    adam.yaml must not be refused for betas the user never typed.
    """
    if list(settings.betas) == OptimizerSettings().betas:
        return
    if "betas" not in inspect.signature(getattr(torch.optim, settings.name)).parameters:
        unused(
            f"{key}.betas",
            list(settings.betas),
            f"torch.optim.{settings.name} has no betas",
            f"remove it, or pick an optimizer that has them ({key}.name=Adam or AdamW)",
        )


class EMA:
    """A frozen copy of the generator that tracks its weights: ema <- decay * ema + (1 - decay) * weights.

    The decay ramps up as min(decay, (1 + s) / (10 + s)) so early samples are not dominated by the
    random initialization, where s counts the updates since `start` (trainer.ema_start); before it the
    average is a plain copy of the weights, so the first, fast-moving steps are left out of it.
    BatchNorm running statistics can't be averaged like weights: those of the live generator belong to
    its weights, not to the average, and sampling runs in eval mode on them. So `calibrated()` measures
    them afresh for the averaged weights ("standing statistics", as in BigGAN) on a fixed set of
    latents before the copy is sampled or saved.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float,
        latents: Callable[[torch.Generator], torch.Tensor],
        device: torch.device,
        batches: int = 16,
        start: int = 0,
    ):
        self.decay, self.start = decay, start
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.latents, self.device, self.batches = latents, device, batches  # latents(generator) -> one batch
        self.norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.stale = bool(self.norms)
        # Other buffers (if any) follow the live model; BatchNorm's are measured by calibrated().
        measured = {id(b) for m in self.norms for b in m.buffers()}
        self.copied = [i for i, b in enumerate(self.model.buffers()) if id(b) not in measured]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | torch.Tensor) -> None:
        """`step` is the number of updates so far; a tensor (a CUDA graph's counter, speed.CapturedStep) is
        read and advanced on the device, so the decay ramp goes on while the graph replays."""
        ema_params, params = list(self.model.parameters()), [p.detach() for p in model.parameters()]
        if isinstance(step, torch.Tensor):
            since = step.sub(self.start)
            ramp = since.clamp(min=0)  # (where(since >= 0, ..., 0.0) would make a tensor of 0.0 inside the graph)
            decay = ramp.add(1).div(ramp.add(10)).clamp(max=self.decay).mul(since >= 0)
            step.add_(1)
            # ema += (weights - ema) * (1 - decay), the weight a device tensor. Not _foreach_lerp_: it has no
            # overload for one tensor weight, and would read it on the host (.item(), a sync a CUDA graph forbids).
            steps = torch._foreach_sub(params, ema_params)
            torch._foreach_mul_(steps, decay.neg().add(1))
            torch._foreach_add_(ema_params, steps)
        else:
            since = step - self.start
            decay = min(self.decay, (1 + since) / (10 + since)) if since >= 0 else 0.0
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        if self.copied:
            ema_buffers, buffers = list(self.model.buffers()), list(model.buffers())
            for i in self.copied:
                ema_buffers[i].copy_(buffers[i])
        self.mark_updated()

    def mark_updated(self) -> None:
        """The averaged weights changed (also after a graph replay, which runs no Python): re-measure BatchNorm."""
        self.stale = bool(self.norms)

    @torch.no_grad()
    def calibrated(self) -> nn.Module:
        """The averaged generator with BatchNorm statistics of its own weights; recomputed only after an update.

        The latents come from a fixed seed, so every DDP rank (and a resumed run) gets the same statistics.
        """
        if self.stale:
            momenta = [m.momentum for m in self.norms]
            for m in self.norms:
                m.reset_running_stats()
                m.momentum = None  # a plain average over all batches
            generator = torch.Generator(self.device).manual_seed(0)
            self.model.train()
            for _ in range(self.batches):
                self.model(self.latents(generator))
            self.model.eval()
            for m, momentum in zip(self.norms, momenta, strict=False):
                m.momentum = momentum
            self.stale = False
        return self.model
