"""Images and latents for every command: latents per seed, G's images, uint8 pixels, grids and GIFs.

Image i of a grid with `seed=s` comes from seed s+i, and every latent vector is drawn on the CPU
from its own seed, so an image depends on its seed only: not on the batch size, nor on the device.
Every file is written atomically (files.atomic_write): a kill never leaves a half-written image.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import torch
from PIL import Image
from torch import nn

from dcgan import files, models
from dcgan.errors import UserError


def latents(
    seeds: List[int],
    z_dim: int,
    distribution: str,
    device: torch.device | str = "cpu",
    truncation: Optional[float] = None,
) -> torch.Tensor:
    """One latent vector per seed, [len(seeds), z_dim], each drawn from its own CPU generator.

    `truncation` (the truncation trick; None = off) keeps latents near the mode, where G is at its
    best: normal entries beyond +-truncation are redrawn, uniform latents are scaled to U(-t, t).
    """
    rows = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        z = models.random_latents((z_dim,), distribution, generator)
        if truncation is not None:
            z = z * truncation if distribution == "uniform" else redraw_beyond(z, truncation, generator)
        rows.append(z)
    return torch.stack(rows).to(device)


def redraw_beyond(z: torch.Tensor, threshold: float, generator: torch.Generator) -> torch.Tensor:
    """BigGAN's truncation trick: every entry with |z| > threshold is redrawn from N(0, 1) cut to +-threshold.

    Redrawing, not clamping, gives a truncated normal with no pile-up at +-threshold; entries already
    inside are kept. Each redraw inverts the normal CDF on one uniform number (no rejection loop, so
    any threshold > 0 is quick), drawn from the seed's own generator: a seed still fixes its latent.
    """
    outside = z.abs() > threshold
    low = torch.special.ndtr(torch.tensor(-threshold, dtype=torch.float64))  # P(z < -threshold)
    uniform = torch.rand(int(outside.sum()), generator=generator, dtype=torch.float64)
    redrawn = torch.special.ndtri(low + uniform * (1 - 2 * low))
    z[outside] = redrawn.clamp(-threshold, threshold).float()  # the clamp only absorbs rounding at the edges
    return z


@torch.no_grad()
def generate(
    G: nn.Module, z: torch.Tensor, labels: Optional[torch.Tensor] = None, batch_size: int = 256
) -> torch.Tensor:
    """Images in [-1, 1] from G in eval mode (BatchNorm uses its running statistics); `labels`, the class of
    each image for a conditional G (None: each class in turn, models.every_class)."""
    was_training = G.training
    G.eval()
    try:
        if labels is None:
            return torch.cat([G(chunk).float() for chunk in z.split(batch_size)])
        pairs = zip(z.split(batch_size), labels.to(z.device).split(batch_size), strict=True)
        return torch.cat([G(chunk, classes).float() for chunk, classes in pairs])
    finally:
        G.train(was_training)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def to_pil(image: torch.Tensor) -> Image.Image:
    """A uint8 [C, H, W] tensor as a PIL image (L for one channel, RGB for three)."""
    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array, "L" if array.shape[2] == 1 else "RGB")


def grid_image(images: torch.Tensor, nrow: int, padding: int = 2) -> Image.Image:
    """Images in [-1, 1] (or already uint8) as one grid: `nrow` per row, `padding` black pixels around each.

    The layout of torchvision's make_grid, built in uint8 here: importing torchvision would add a
    second or more to the start of every command.
    """
    pixels = images.cpu() if images.dtype == torch.uint8 else to_uint8(images)
    count, channels, height, width = pixels.shape
    if count == 1:  # a lone image is written bare, as make_grid does
        return to_pil(pixels[0])
    columns = min(nrow, count)
    rows = -(-count // columns)
    grid = torch.zeros(
        channels, rows * (height + padding) + padding, columns * (width + padding) + padding, dtype=torch.uint8
    )
    for index, image in enumerate(pixels):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[:, top : top + height, left : left + width] = image
    return to_pil(grid)


def save_atomically(image: Image.Image, path: Path, **save_args) -> None:
    """Write to a temporary file and rename, so a kill never leaves a half-written image."""
    image_format = save_args.pop("format", None) or path.suffix.lstrip(".").upper().replace("JPG", "JPEG")
    files.atomic_write(path, lambda file: image.save(file, format=image_format, **save_args))


def save_grid(images: torch.Tensor, path: Path, nrow: int, scale: int = 1) -> Image.Image:
    """Write the grid, each pixel a `scale` x `scale` block, and return it (the trainer also shows it in
    TensorBoard)."""
    image = enlarge(grid_image(images, nrow), scale)
    save_atomically(image, path)
    return image


def enlarge(image: Image.Image, scale: int) -> Image.Image:
    """`image` with each pixel a `scale` x `scale` block (nearest neighbour: no new colours, no blur).

    Bounded by what Pillow opens without a DecompressionBombWarning, so every file written opens anywhere.
    """
    if scale == 1:
        return image
    width, height = image.width * scale, image.height * scale
    if width * height > Image.MAX_IMAGE_PIXELS:
        raise UserError(
            f"scale={scale} makes a {width}x{height} image, more than the {Image.MAX_IMAGE_PIXELS:,} pixels image "
            "viewers open without a warning; lower scale or the number of images"
        )
    return image.resize((width, height), Image.NEAREST)


# GIF frame delays are whole 1/100 s, and browsers play delays under 2/100 s at 1/10 s: a faster frame rate
# than this makes a movie slower, not faster.
MAX_GIF_FPS = 50


def save_gif(frames: Sequence[Image.Image], path: Path, duration_ms: int | List[int]) -> None:
    """An endlessly looping GIF; `duration_ms` for every frame, or one per frame."""
    frames = [frame.convert("P" if frame.mode == "L" else "RGB") for frame in frames]
    save_atomically(
        frames[0], path, format="GIF", save_all=True, append_images=frames[1:], duration=duration_ms, loop=0
    )
