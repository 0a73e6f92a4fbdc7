"""Optimizers from config, and the exponential moving average of the generator."""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from dcgan.config import OptimizerSettings, UserError


def build_optimizer(params, settings: OptimizerSettings, key: str, fused: bool = False) -> torch.optim.Optimizer:
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
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise UserError(f"{key}: torch.optim.{settings.name} takes no argument {', '.join(unknown)}; remove it from {key}")
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError) as error:
        raise UserError(f"{key}: torch.optim.{settings.name} rejected its settings: {error}") from None


class EMA:
    """A frozen copy of the generator that tracks its weights: ema <- decay * ema + (1 - decay) * weights.

    The decay ramps up as min(decay, (1 + step) / (10 + step)) so early samples are not dominated by
    the random initialization. BatchNorm running statistics are copied, not averaged: they belong to
    the weights that produced them, and sampling runs the copy in eval mode.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
