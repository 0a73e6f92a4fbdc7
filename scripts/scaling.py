"""What limits multi-GPU scaling: per-step gradient all-reduce volume of each preset against its compute.

Measures, for every preset's networks (no data needed): parameter counts, the bytes DDP all-reduces per
training step, and the FLOPs of one training step per image (torch.utils.flop_counter over the same
calls the training loop makes). Prints a Markdown table for docs/SCALING.md.

    python scripts/scaling.py [--batch-size 128] [--d-steps 1]
"""

from __future__ import annotations

import argparse
import datetime

import torch
from torch.utils.flop_counter import FlopCounterMode

from dcgan import models
from dcgan.config import compose
from dcgan.losses import build_loss
from dcgan.train import frozen

PRESETS = ["dcgan64", "tf_dcgan28", "keras_mnist", "keras_fashion", "tf_celeba28", "keras_celeba64"]


def step_flops_per_image(cfg, batch_size: int) -> float:
    """FLOPs of one D update plus one G update, per real image, counted on the CPU."""
    G, D, loss = models.build_generator(cfg), models.build_discriminator(cfg), build_loss(cfg.loss)
    size, channels, z_dim = cfg.dataset.image_size, cfg.dataset.channels, cfg.generator.z_dim
    real = torch.rand(batch_size, channels, size, size) * 2 - 1
    noise = torch.Generator().manual_seed(0)

    def latents() -> torch.Tensor:
        return models.random_latents((batch_size, z_dim), cfg.generator.z_distribution, noise)

    with FlopCounterMode(display=False) as counter:
        # Mirrors one step of train(): D on real and no-grad fakes, then G through a frozen D.
        with torch.no_grad():
            fake = G(latents())
        loss.discriminator(D, real, fake)[0].backward()
        with frozen(D):
            loss.generator(D, G(latents())).backward()
    return counter.get_total_flops() / batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16, help="images per step for the FLOP count")
    args = parser.parse_args()
    print(f"measured {datetime.date.today()} with torch {torch.__version__} (CPU FLOP counter; hardware-independent)\n")
    print("| preset | image | G params | D params | all-reduce per step (fp32) | GFLOP per image per step |")
    print("|---|---|---|---|---|---|")
    for preset in PRESETS:
        cfg = compose("train", [f"preset={preset}"])
        G, D = models.build_generator(cfg, "meta"), models.build_discriminator(cfg, "meta")
        g_params = sum(p.numel() for p in G.parameters())
        d_params = sum(p.numel() for p in D.parameters())
        # DDP all-reduces D's gradients after each D update and G's after each G update (D is frozen then).
        megabytes = 4 * (g_params + cfg.trainer.d_steps * d_params) / 1e6
        flops = step_flops_per_image(cfg, args.batch_size)
        side = cfg.dataset.image_size
        print(
            f"| `{preset}` | {side}x{side}x{cfg.dataset.channels} | {g_params / 1e6:.2f} M | {d_params / 1e6:.2f} M "
            f"| {megabytes:.1f} MB | {flops / 1e9:.3f} |"
        )


if __name__ == "__main__":
    main()
