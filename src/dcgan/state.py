"""The training state: everything a checkpoint holds, as one typed object, and the checkpoint's keys.

`TrainingState.state_dict()` is what checkpoint.save writes; `load_state_dict()` continues a run
from it, bit for bit. The keys below are the file format (checkpoint.FORMAT_VERSION): they are
spelled here only, and renaming one would orphan every checkpoint written before. Code that reads
a checkpoint without training (gan-sample, gan-eval, the run folder's checks, a rollback) reads it
through these names and `sampling_weights`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from omegaconf import OmegaConf
from torch import nn

from dcgan.data import ImageBatches, Labels
from dcgan.errors import UserError
from dcgan.guard import Guard
from dcgan.optim import BASE_LR, EMA
from dcgan.speed import Precision

log = logging.getLogger(__name__)

# The checkpoint's keys.
GENERATOR = "generator"  # G's state dict
DISCRIMINATOR = "discriminator"  # D's state dict
GENERATOR_EMA = "generator_ema"  # the EMA generator's (BatchNorm statistics of its own weights); None with ema=0
OPTIMIZERS = {"generator": "optimizer_g", "discriminator": "optimizer_d"}  # optimizer.<part> -> its state dict
STEP = "step"  # generator updates done
EPOCH = "epoch"  # passes over the data set (for people; DATA is what resumes)
DATA = "data"  # where the batches are (data.ImageBatches.state_dict)
RNG = "rng"  # {"noise": the training latents' generator, "torch": the CPU stream, "cuda": one per GPU}
CONFIG_YAML = "config_yaml"  # the resolved config: all gan-sample needs to rebuild G
HEALTH = "health"  # the guard's memory (guard.Guard.state_dict)
GRAD_SCALER = "grad_scaler"  # with trainer.amp=fp16: the loss scale (torch.amp.GradScaler.state_dict); else absent
CLASSES = "classes"  # conditional=true: the class names, by label index (G's and D's label input); else absent
REPLICA_CHECKSUMS = "replica_checksums"  # under torchrun: each rank's weight checksums, equal when in sync
REQUIRED = (GENERATOR, DISCRIMINATOR, CONFIG_YAML, STEP)  # what a file must hold to be a checkpoint of this tool


@dataclass
class TrainingState:
    """The networks, their optimizers, the data position, the random streams and the guard's memory."""

    G: nn.Module
    D: nn.Module
    G_ema: Optional[EMA]  # None with trainer.ema=0
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    batches: ImageBatches
    noise: torch.Generator  # the training latents' random stream
    guard: Guard
    config_yaml: str  # this run's resolved config (checkpoint.config_yaml)
    precision: Optional[Precision] = None  # what trainer.amp resolved to on this device
    scaler: Optional[torch.amp.GradScaler] = None  # fp16's loss scale
    labels: Optional[Labels] = None  # conditional=true: each image's class, and the class names
    step: int = 0  # generator updates done

    @property
    def classes(self) -> Tuple[str, ...]:
        """The class names G and D take labels of; () for an unconditional run."""
        return self.labels.names if self.labels is not None else ()

    def sampling_generator(self) -> nn.Module:
        """What grids, evaluations and gan-sample draw with: the EMA generator when there is one."""
        return self.G_ema.calibrated() if self.G_ema is not None else self.G

    def state_dict(self) -> Dict[str, Any]:
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {
            GENERATOR: self.G.state_dict(),
            DISCRIMINATOR: self.D.state_dict(),
            GENERATOR_EMA: self.G_ema.calibrated().state_dict() if self.G_ema is not None else None,
            OPTIMIZERS["generator"]: self.opt_g.state_dict(),
            OPTIMIZERS["discriminator"]: self.opt_d.state_dict(),
            STEP: self.step,
            EPOCH: self.batches.epoch,
            DATA: self.batches.state_dict(),
            RNG: {"noise": self.noise.get_state(), "torch": torch.get_rng_state(), "cuda": cuda_rng},
            CONFIG_YAML: self.config_yaml,
            HEALTH: self.guard.state_dict(),
            **({GRAD_SCALER: self.scaler.state_dict()} if self.scaler is not None else {}),
            **({CLASSES: list(self.classes)} if self.classes else {}),
        }

    def load_state_dict(self, saved: Dict[str, Any]) -> None:
        """Continue from a checkpoint: the same weights, moments, batches, random numbers and guard memory."""
        check_same_classes(saved, self.classes)
        self.G.load_state_dict(saved[GENERATOR])
        self.D.load_state_dict(saved[DISCRIMINATOR])
        if self.G_ema is not None:
            self.G_ema.model.load_state_dict(saved[GENERATOR_EMA] or saved[GENERATOR])
        load_optimizer(self.opt_g, saved[OPTIMIZERS["generator"]])
        load_optimizer(self.opt_d, saved[OPTIMIZERS["discriminator"]])
        self.batches.load_state_dict(saved[DATA])
        self.step = int(saved[STEP])
        self.guard.load_state_dict(saved.get(HEALTH) or {}, self.step)
        if self.scaler is not None and saved.get(GRAD_SCALER):
            self.scaler.load_state_dict(saved[GRAD_SCALER])
        self.apply_changed_learning_rates(saved)
        rng = saved[RNG]
        try:
            self.noise.set_state(rng["noise"])
        except RuntimeError:  # a CUDA generator's state means nothing to a CPU one, and vice versa
            log.warning("the checkpoint's latent stream comes from another device type; continuing with a fresh one")
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def apply_changed_learning_rates(self, saved: Dict[str, Any]) -> None:
        """Learning rates changed on the command line since the checkpoint replace the saved ones.

        The optimizers' state dicts carry their learning rates, so without this a resume would silently
        keep the old rate even when the user lowered it on the command line after a divergence. A rate
        equal to the checkpoint's config keeps the optimizer's own (which a rollback may have lowered).
        """
        before, now = OmegaConf.create(saved[CONFIG_YAML]), OmegaConf.create(self.config_yaml)
        for part, optimizer in (("generator", self.opt_g), ("discriminator", self.opt_d)):
            key = f"optimizer.{part}.lr"
            old, new = OmegaConf.select(before, key), OmegaConf.select(now, key)
            if old != new:
                log.info("%s is %g in this run, %g in the checkpoint: continuing with %g", key, new, old, new)
                set_learning_rate(optimizer, new)


def check_same_classes(saved: Dict[str, Any], classes: Tuple[str, ...]) -> None:
    """A run continues only on the classes its networks learned: label i must still mean class i."""
    before = tuple(saved.get(CLASSES) or ())
    if before == classes:
        return
    if not before or not classes:
        raise conditional_changed(bool(before))
    raise UserError(
        f"the checkpoint's {len(before)} classes ({', '.join(before[:6])}{', ...' if len(before) > 6 else ''}) are "
        f"not this data's {len(classes)} ({', '.join(classes[:6])}{', ...' if len(classes) > 6 else ''}); resume on "
        "the data set the run began with"
    )


def conditional_changed(was_conditional: bool) -> UserError:
    """The refusal of a resume that turns conditional training on or off: the networks' inputs would change."""
    was, now = ("true", "false") if was_conditional else ("false", "true")
    return UserError(f"the checkpoint was trained with conditional={was}, not {now}; resume with conditional={was}")


def load_optimizer(optimizer: torch.optim.Optimizer, saved: Dict[str, Any]) -> None:
    """The saved moments and step counts, with this run's hyperparameters (betas, weight decay, kernel choice).

    `load_state_dict` takes every group setting from the checkpoint; only the learning rate keeps the saved value
    here, since a rollback may have lowered it (apply_changed_learning_rates applies one changed on the command line).
    """
    kept = ("params", "lr", BASE_LR)
    fresh = [{key: value for key, value in group.items() if key not in kept} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, settings in zip(optimizer.param_groups, fresh, strict=True):
        group.update(settings)
        group.setdefault(BASE_LR, group["lr"])  # checkpoints written before trainer.lr_decay existed
    place_step_counts(optimizer)


def place_step_counts(optimizer: torch.optim.Optimizer) -> None:
    """Each step count where this run's update reads it: with its weights for a fused or capturable update
    (read on the device; one on the host would fail a CUDA graph's capture), on the CPU otherwise (the plain
    update reads it with .item(), a sync per parameter per step if it sat on the GPU). torch.optim's
    load_state_dict placed them for the checkpoint's settings, which a resume may have changed."""
    for group in optimizer.param_groups:
        with_weights = bool(group.get("fused") or group.get("capturable"))
        for parameter in group["params"]:
            values = optimizer.state.get(parameter, {})
            step = values.get("step")
            if isinstance(step, torch.Tensor):
                device = parameter.device if with_weights else torch.device("cpu")
                values["step"] = step.to(device=device, dtype=torch.float32)


def set_learning_rate(optimizer: torch.optim.Optimizer | Dict[str, Any], lr: float) -> None:
    """On an optimizer or on its state dict: the rate trainer.lr_decay starts from, and the current one."""
    groups = optimizer["param_groups"] if isinstance(optimizer, dict) else optimizer.param_groups
    for group in groups:
        group["lr"] = group[BASE_LR] = lr


def sampling_weights(saved: Dict[str, Any], use_ema: bool = True) -> Tuple[Dict[str, Any], str]:
    """A checkpoint's generator weights to sample with, and which: "ema" when asked for and saved, else "generator"."""
    if use_ema and saved.get(GENERATOR_EMA) is not None:
        return saved[GENERATOR_EMA], "ema"
    return saved[GENERATOR], "generator"
