"""Sampling from a checkpoint alone: grids, per-seed images and latent interpolations (`gan-sample`).

Image i of a grid with `seed=s` comes from seed s+i, and every latent vector is drawn on the CPU
from its own seed, so an image depends on its seed only: not on the batch size, nor on the device.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List

import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn
from torchvision.utils import make_grid

from dcgan import checkpoint, models
from dcgan.config import (
    SampleConfig,
    UserError,
    compose,
    exit_with,
    resolve_device,
    train_config_from_yaml,
    validate_device,
)


def latents(seeds: List[int], z_dim: int, distribution: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """One latent vector per seed, [len(seeds), z_dim], each drawn from its own CPU generator."""
    rows = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        if distribution == "uniform":
            rows.append(torch.rand(z_dim, generator=generator) * 2 - 1)
        else:
            rows.append(torch.randn(z_dim, generator=generator))
    return torch.stack(rows).to(device)


@torch.no_grad()
def generate(G: nn.Module, z: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Images in [-1, 1] from G in eval mode (BatchNorm uses its running statistics)."""
    was_training = G.training
    G.eval()
    try:
        return torch.cat([G(chunk).float() for chunk in z.split(batch_size)])
    finally:
        G.train(was_training)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def to_pil(image: torch.Tensor) -> Image.Image:
    """A uint8 [C, H, W] tensor as a PIL image (L for one channel, RGB for three)."""
    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array, "L" if array.shape[2] == 1 else "RGB")


def grid_image(images: torch.Tensor, nrow: int) -> Image.Image:
    grid = make_grid(to_uint8(images).float(), nrow=nrow, padding=2, pad_value=0).to(torch.uint8)
    return to_pil(grid[:1] if images.shape[1] == 1 else grid)


def save_atomically(image: Image.Image, path: Path, **save_args) -> None:
    """Write to a temporary file and rename, so a kill never leaves a half-written image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    image.save(temporary, format=save_args.pop("format", None) or path.suffix.lstrip(".").upper().replace("JPG", "JPEG"), **save_args)
    os.replace(temporary, path)


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    save_atomically(grid_image(images, nrow), path)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation: stays on the shell where Gaussian latents live, unlike a straight line."""
    cos = (a * b).sum() / (a.norm() * b.norm())
    omega = torch.arccos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    if omega.abs() < 1e-4:
        return torch.lerp(a, b, t)
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def parse_seeds(text: str) -> List[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]."""
    seeds: List[int] = []
    try:
        for part in str(text).replace(" ", "").split(","):
            if not part:
                continue
            if "-" in part[1:]:
                first, last = part.split("-", 1) if not part.startswith("-") else (part, part)
                seeds.extend(range(int(first), int(last) + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise UserError(f"seeds={text!r} is not a seed list; write it like 0-15 or 3,7,42") from None
    return seeds


def load_generator(path: str | Path, device: torch.device, use_ema: bool = True):
    """Rebuild the generator from the config stored in a checkpoint; EMA weights when present."""
    state = checkpoint.load(path)
    cfg = train_config_from_yaml(state["config_yaml"])
    G = models.build_generator(cfg, "cpu")
    weights = state.get("generator_ema") if use_ema and state.get("generator_ema") is not None else state["generator"]
    try:
        G.load_state_dict(weights)
    except RuntimeError as error:
        raise UserError(f"checkpoint {path} does not match the generator its config describes: {str(error)[:200]}") from None
    return G.to(device).eval(), cfg, state


def run(cfg: SampleConfig) -> List[Path]:
    """Write what `cfg.mode` asks for; returns the files written."""
    validate_device("device", cfg.device)
    if cfg.ckpt in ("???", "", None):
        raise UserError("no checkpoint given: pass ckpt=PATH (e.g. ckpt=outputs/RUN/checkpoints/last.pt)")
    device = resolve_device(cfg.device)
    G, train_cfg, _ = load_generator(cfg.ckpt, device, cfg.ema)
    z_dim, distribution = train_cfg.generator.z_dim, train_cfg.generator.z_distribution
    out = Path(cfg.out)
    if cfg.mode == "grid":
        if cfg.n < 1 or cfg.nrow < 1:
            raise UserError(f"n and nrow must be >= 1, got n={cfg.n} nrow={cfg.nrow}")
        images = generate(G, latents(list(range(cfg.seed, cfg.seed + cfg.n)), z_dim, distribution, device))
        save_grid(images, out, cfg.nrow)
        return [out]
    if cfg.mode == "seeds":
        seeds = parse_seeds(cfg.seeds) if cfg.seeds else list(range(cfg.seed, cfg.seed + cfg.n))
        images = to_uint8(generate(G, latents(seeds, z_dim, distribution, device)))
        folder = out if out.suffix == "" else out.with_suffix("")
        paths = [folder / f"seed{seed:04d}.png" for seed in seeds]
        for image, path in zip(images, paths):
            save_atomically(to_pil(image), path)
        return paths
    if cfg.mode == "interpolate":
        keys = parse_seeds(cfg.seeds) if cfg.seeds else [cfg.seed, cfg.seed + 1]
        if len(keys) < 2 or cfg.frames < 1 or cfg.fps < 1:
            raise UserError("interpolate needs at least two seeds (seeds=0,1,2), frames >= 1 and fps >= 1")
        key_z = latents(keys, z_dim, distribution)
        # A closed loop through the key seeds: frames per leg, last leg back to the first seed.
        path_z = [
            slerp(key_z[i], key_z[(i + 1) % len(keys)], step / cfg.frames)
            for i in range(len(keys))
            for step in range(cfg.frames)
        ]
        images = to_uint8(generate(G, torch.stack(path_z).to(device)))
        frames = [to_pil(image).convert("P" if images.shape[1] == 1 else "RGB") for image in images]
        if out.suffix.lower() != ".gif":
            out = out.with_suffix(".gif")
        out.parent.mkdir(parents=True, exist_ok=True)
        temporary = out.with_name(f".{out.name}.tmp")
        frames[0].save(temporary, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / cfg.fps), loop=0)
        os.replace(temporary, out)
        return [out]
    raise UserError(f"mode={cfg.mode!r} is not a sampling mode; choose grid, seeds or interpolate")


def main(argv: List[str] | None = None) -> None:
    """`gan-sample ckpt=PATH [mode=grid|seeds|interpolate] [n=64] [nrow=8] [seed=0] [out=grid.png] [device=cpu]`."""
    args = sys.argv[1:] if argv is None else argv
    # Hydra reads a,b as a sweep; for seeds it can only mean a list, so quote it on the user's behalf.
    args = [f"seeds='{a[6:]}'" if a.startswith("seeds=") and "," in a and a[6:7] not in "'\"[" else a for a in args]
    try:
        cfg = compose("sample", args)
        written = run(OmegaConf.to_object(cfg))
    except UserError as error:
        exit_with(error, "gan-sample")
    for path in written[:3]:
        print(f"wrote {path}")
    if len(written) > 3:
        print(f"... and {len(written) - 3} more in {written[0].parent}")


if __name__ == "__main__":
    main()
