"""GAN losses as small objects: `discriminator(D, real, fake)` and `generator(D, fake)`.

D always returns logits (never a Sigmoid followed by BCELoss: autocast rejects that pair, and
softplus on logits is the numerically stable form). A loss owns its calls to D so that penalties
which need D itself (WGAN-GP) fit the same interface, and the training loop never knows which
loss it runs. Each `discriminator` call also returns detached statistics for logging; reading them
is left to the logger, so nothing here syncs the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from dcgan.errors import UserError, at_least, finite, one_of, unused


@dataclass
class LossConfig:
    name: str = "ns"  # a name in losses.LOSSES: ns (non-saturating BCE) | hinge | lsgan | wgan_gp, or one you register
    real_label: float = 1.0  # target for real images; 0.9 is one-sided label smoothing (ns, lsgan)
    gp_weight: float = 10.0  # gradient-penalty weight (wgan_gp)
    r1_weight: float = 0.0  # R1 penalty gamma on real images, gamma/2 * |grad D(x)|^2 (Mescheder et al. 2018); 0 = off
    # Lazy R1 (StyleGAN2): the penalty on every k-th D update only, weighted k times, for about the same effect
    # at a fraction of the cost of a double backward.
    r1_every: int = 1


Stats = Dict[str, torch.Tensor]


class GANLoss:
    # Logit threshold between "real" and "fake" for D's accuracy.
    decision_threshold = 0.0
    # True when the loss itself differentiates a gradient (create_graph=True), as WGAN-GP's penalty does.
    double_backward = False
    # The LossConfig settings of its own that the loss reads (R1's are every loss's); validate_loss refuses the
    # others when they are changed, as they would do nothing. A loss registered elsewhere may read any.
    reads: Tuple[str, ...] = ("real_label", "gp_weight")

    def __init__(self, cfg: LossConfig):
        self.real_label = cfg.real_label
        self.gp_weight = cfg.gp_weight
        self.r1_weight, self.r1_every = cfg.r1_weight, cfg.r1_every

    @property
    def needs_double_backward(self) -> bool:
        """Whether D's update takes the gradient of a gradient (the loss's own penalty, or R1), which
        torch.compile can't: speed.py then leaves D eager."""
        return self.double_backward or self.r1_weight > 0

    def d_terms(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def generator(self, D: nn.Module, fake: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """What D(x) means in the logs: a probability for ns, the raw score otherwise."""
        return logits

    def discriminator(
        self, D: nn.Module, real: torch.Tensor, fake: torch.Tensor, update: int = 0
    ) -> Tuple[torch.Tensor, Stats]:
        """D's loss and statistics; `update` counts D's updates so far (lazy R1 picks every r1_every-th)."""
        # Separate calls for real and fake keep BatchNorm statistics per batch, as in the DCGAN paper.
        # R1 differentiates D's output with respect to the real images, so they must track gradients.
        regularize = self.r1_weight > 0 and update % self.r1_every == 0
        real = real.detach().requires_grad_(regularize)
        real_logits, fake_logits = D(real).float(), D(fake).float()
        loss = self.d_terms(real_logits, fake_logits)
        if regularize:
            penalty = r1_penalty(real_logits, real)
            loss = loss + self.r1_weight * self.r1_every / 2 * penalty
        with torch.no_grad():
            accuracy = 0.5 * (
                (real_logits > self.decision_threshold).float().mean()
                + (fake_logits < self.decision_threshold).float().mean()
            )
            stats = {
                "d_real": self.score(real_logits).mean(),
                "d_fake": self.score(fake_logits).mean(),
                "d_accuracy": accuracy,
            }
            if regularize:  # logged as the mean over the updates that measured it (log.MetricsLog)
                stats["r1_penalty"] = penalty.detach()
        return loss, stats


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder, Geiger & Nowozin 2018): E[|grad_x D(x)|^2] over real images; the loss adds gamma/2 times it.

    It pushes D's gradient at the data toward zero, which damps the oscillation of unregularized GANs.
    create_graph=True so D's update also follows the penalty's own gradient.
    """
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.float().square().flatten(1).sum(1).mean()


# Every loss by loss.name, in registration order (the order error messages list them in).
LOSSES: Dict[str, Type[GANLoss]] = {}


def loss(name: str):
    """Register a GANLoss subclass as the loss `name`, selected by loss.name=NAME."""

    def register(cls: Type[GANLoss]) -> Type[GANLoss]:
        LOSSES[name] = cls
        return cls

    return register


@loss("ns")
class NonSaturating(GANLoss):
    """Goodfellow et al.'s non-saturating loss: binary cross-entropy on logits."""

    reads = ("real_label",)

    def d_terms(self, real_logits, fake_logits):
        # -real_label*log(sigmoid(r)) - (1-real_label)*log(1-sigmoid(r)) - log(1 - sigmoid(f));
        # real_label < 1 is one-sided label smoothing (Salimans et al. 2016).
        real = F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, self.real_label))
        fake = F.softplus(fake_logits).mean()  # -log(1 - sigmoid(f))
        return real + fake

    def generator(self, D, fake):
        return F.softplus(-D(fake).float()).mean()  # -log(sigmoid(D(G(z))))

    def score(self, logits):
        return torch.sigmoid(logits)


@loss("hinge")
class Hinge(GANLoss):
    """Hinge loss (Lim & Ye 2017; SAGAN, BigGAN)."""

    reads = ()

    def d_terms(self, real_logits, fake_logits):
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()

    def generator(self, D, fake):
        return -D(fake).float().mean()


@loss("lsgan")
class LeastSquares(GANLoss):
    """LSGAN (Mao et al. 2017) with targets a=0 (fake), b=real_label (real), c=1 (G's target)."""

    decision_threshold = 0.5
    reads = ("real_label",)

    def d_terms(self, real_logits, fake_logits):
        return 0.5 * ((real_logits - self.real_label) ** 2).mean() + 0.5 * (fake_logits**2).mean()

    def generator(self, D, fake):
        return 0.5 * ((D(fake).float() - 1) ** 2).mean()


@loss("wgan_gp")
class WassersteinGP(GANLoss):
    """WGAN-GP (Gulrajani et al. 2017): critic E[D(fake)] - E[D(real)] + gp_weight * E[(|grad D(x_hat)| - 1)^2]."""

    double_backward = True
    reads = ("gp_weight",)

    def d_terms(self, real_logits, fake_logits):
        return fake_logits.mean() - real_logits.mean()

    def discriminator(self, D, real, fake, update=0):
        loss, stats = super().discriminator(D, real, fake, update)
        # The penalty runs outside autocast: its second-order gradient is poorly conditioned in bf16.
        with torch.autocast(device_type=real.device.type, enabled=False):
            alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
            mixed = (alpha * real.float() + (1 - alpha) * fake.float()).requires_grad_(True)
            (grad,) = torch.autograd.grad(D(mixed).sum(), mixed, create_graph=True)
            penalty = ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
        stats["gradient_penalty"] = penalty.detach()
        return loss + self.gp_weight * penalty, stats

    def generator(self, D, fake):
        return -D(fake).float().mean()


def build_loss(cfg: LossConfig) -> GANLoss:
    return LOSSES[cfg.name](cfg)


def validate_loss(cfg: LossConfig) -> None:
    one_of("loss.name", cfg.name, tuple(LOSSES))
    for key in ("real_label", "gp_weight", "r1_weight"):
        finite(f"loss.{key}", cfg[key])
    if not 0.0 < cfg.real_label <= 1.0:
        raise UserError(f"loss.real_label must be in (0, 1], got {cfg.real_label}")
    if cfg.gp_weight < 0:
        raise UserError(f"loss.gp_weight must be >= 0, got {cfg.gp_weight}")
    if cfg.r1_weight < 0:
        raise UserError(f"loss.r1_weight must be >= 0 (0 turns R1 off), got {cfg.r1_weight}")
    at_least("loss.r1_every", cfg.r1_every, 1)
    check_settings_used(cfg)


def check_settings_used(cfg: LossConfig) -> None:
    """A loss setting changed for a loss that never reads it (loss=hinge loss.real_label=0.9) is refused."""
    defaults = LossConfig()
    for key in ("real_label", "gp_weight"):
        if cfg[key] != getattr(defaults, key) and key not in LOSSES[cfg.name].reads:
            readers = [name for name, cls in LOSSES.items() if key in cls.reads]
            unused(
                f"loss.{key}", cfg[key], f"loss={cfg.name} does not use it", f"use it with loss={' or '.join(readers)}"
            )
    if cfg.r1_every != defaults.r1_every and cfg.r1_weight == 0:
        unused("loss.r1_every", cfg.r1_every, "R1 is off (loss.r1_weight=0)", "set loss.r1_weight > 0 too, e.g. 10")
