"""DiffAugment: differentiable augmentation of everything the discriminator sees (`augment.policy`).

Zhao, Liu, Lin, Zhu & Han 2020, "Differentiable Augmentation for Data-Efficient GAN Training"
(arXiv:2006.10738; reference code github.com/mit-han-lab/data-efficient-gans, DiffAugment_pytorch.py).
The same kind of random transform is applied to real and fake images, in D's update and in G's, and
every op is built from differentiable tensor arithmetic and indexing, so G's gradient flows through it.
D never sees an un-augmented image, so it cannot simply memorize a small training set, and G is not
pushed to reproduce the augmentations (they apply to its images too).

Images are in [-1, 1], as in the reference code. The color ops shift and scale values (brightness by
up to +-0.5, saturation x[0, 2], contrast x[0.5, 1.5]), so augmented images may leave [-1, 1], exactly
as in the paper; translation pads and cutout fills with 0, the middle of the range.
Randomness comes from torch's global generator, whose state every checkpoint saves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dcgan.errors import UserError


@dataclass
class AugmentConfig:
    # DiffAugment (Zhao et al. 2020): the same random, differentiable transforms applied to every image D
    # sees, real and fake, in both D and G updates. Any of color, translation, cutout; [] = off.
    # e.g. augment.policy=[color,translation,cutout]
    policy: List[str] = field(default_factory=list)


TRANSLATION_RATIO = 0.125  # shift by up to 1/8 of the side, as in the paper
CUTOUT_RATIO = 0.5  # erase a square of half the side, as in the paper


def random_brightness(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) - 0.5)


def random_saturation(x: torch.Tensor) -> torch.Tensor:
    # Scales each pixel's distance from its channel mean; a no-op on one-channel images.
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) * 2) + mean


def random_contrast(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) + 0.5) + mean


def random_translation(x: torch.Tensor, ratio: float = TRANSLATION_RATIO) -> torch.Tensor:
    """Shift each image by up to ratio * side pixels in x and y, filling the uncovered border with 0."""
    batch, _, height, width = x.shape
    shift_y, shift_x = int(height * ratio + 0.5), int(width * ratio + 0.5)
    dy = torch.randint(-shift_y, shift_y + 1, size=[batch, 1, 1], device=x.device)
    dx = torch.randint(-shift_x, shift_x + 1, size=[batch, 1, 1], device=x.device)
    b, y, xx = torch.meshgrid(
        torch.arange(batch, device=x.device),
        torch.arange(height, device=x.device),
        torch.arange(width, device=x.device),
        indexing="ij",
    )
    # Index into a copy padded by one zero pixel: sources beyond the edge clamp onto that padding.
    y = torch.clamp(y + dy + 1, 0, height + 1)
    xx = torch.clamp(xx + dx + 1, 0, width + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    return padded.permute(0, 2, 3, 1)[b, y, xx].permute(0, 3, 1, 2).contiguous()


def random_cutout(x: torch.Tensor, ratio: float = CUTOUT_RATIO) -> torch.Tensor:
    """Zero one square of ratio * side pixels per image, at a random centre (it may overhang the edge)."""
    batch, _, height, width = x.shape
    size_y, size_x = int(height * ratio + 0.5), int(width * ratio + 0.5)
    offset_y = torch.randint(0, height + (1 - size_y % 2), size=[batch, 1, 1], device=x.device)
    offset_x = torch.randint(0, width + (1 - size_x % 2), size=[batch, 1, 1], device=x.device)
    b, y, xx = torch.meshgrid(
        torch.arange(batch, device=x.device),
        torch.arange(size_y, device=x.device),
        torch.arange(size_x, device=x.device),
        indexing="ij",
    )
    y = torch.clamp(y + offset_y - size_y // 2, min=0, max=height - 1)
    xx = torch.clamp(xx + offset_x - size_x // 2, min=0, max=width - 1)
    mask = torch.ones(batch, height, width, dtype=x.dtype, device=x.device)
    mask.index_put_((b, y, xx), mask.new_zeros(()))  # (`mask[...] = 0` makes a tensor of the Python 0 every step)
    return x * mask.unsqueeze(1)


OPS: Dict[str, List[Callable[[torch.Tensor], torch.Tensor]]] = {
    "color": [random_brightness, random_saturation, random_contrast],
    "translation": [random_translation],
    "cutout": [random_cutout],
}


def parse_policy(policy: Sequence[str]) -> List[str]:
    """The op names of `augment.policy`, checked; raises UserError for an unknown or repeated name."""
    names = [str(name) for name in policy]
    unknown = [name for name in names if name not in OPS]
    if unknown or len(set(names)) != len(names):
        problem = f"unknown op {', '.join(unknown)}" if unknown else f"a repeated op in {names}"
        raise UserError(
            f"augment.policy has {problem}; use a list of {', '.join(OPS)}, e.g. "
            "augment.policy=[color,translation,cutout]"
        )
    return names


def diff_augment(x: torch.Tensor, policy: List[str]) -> torch.Tensor:
    for name in policy:
        for op in OPS[name]:
            x = op(x)
    return x


class Augmented(nn.Module):
    """D as the losses see it: every image is augmented, then judged. Holds D, adds no weights."""

    def __init__(self, D: nn.Module, policy: List[str]):
        super().__init__()
        self.D, self.policy = D, policy

    def forward(self, images: torch.Tensor, **labels: torch.Tensor) -> torch.Tensor:
        return self.D(diff_augment(images, self.policy), **labels)  # a conditional D's labels pass through unchanged


def wrap(D: nn.Module, policy: Sequence[str]) -> nn.Module:
    """D itself when the policy is empty, so runs without augmentation take exactly the same path."""
    names = parse_policy(policy)
    return Augmented(D, names) if names else D
