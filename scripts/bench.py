"""Images per second of the pytorch/examples DCGAN loop and of our trainer: same data, model, batch, process.

The reference is a faithful copy of the algorithm of pytorch/examples dcgan/main.py: PIL images
through torchvision transforms (Resize, ToTensor, Normalize) in a shuffling DataLoader with worker
processes, cudnn.benchmark on, D ending in a Sigmoid with BCELoss, fp32, the fakes of D's update reused (detached) for
G's, and a progress line every step that reads five numbers back from the device (`.item()`).
It leaves out the reference's image and checkpoint files, as our run here writes none in the timed
steps. Both loops train the same networks (our `dcgan` generator and discriminator, built from
the same seed), so both steps do the same arithmetic but for the reference's extra weight gradients
in G's update and our fresh latents for it; each loop's FLOP count is measured separately.

Timing: each loop runs --warmup steps, then --steps timed steps, ended by a device sync. Our
trainer runs through `dcgan.train.train()`, exactly as gan-train does, with metrics rows every
--warmup steps; its speed comes from the rows after the warm-up, which exclude start-up, data
loading and the final checkpoint. With --repeat N every loop is timed N times, in turns (a shared
machine's load then falls on all of them alike), and the median is reported. FLOPs:
torch.utils.flop_counter over one training step (convs and matmuls; ours: a 2-step run minus a
1-step run, so it is the real loop's step).

    python scripts/bench.py --device cuda --data fashion_mnist --root /usr/share/datasets/fashion-mnist \\
        --image-size 64 --batch-size 128 --steps 200 --ours "trainer.amp=off" --ours "trainer.amp=bf16"
    python scripts/bench.py --device cpu --data synthetic --image-size 32 --batch-size 32 --steps 20 \\
        --threads 1 --repeat 3

Prints a table (and with --json, writes the same numbers to a file). docs/PERFORMANCE.md has results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torchvision.transforms as transforms
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from dcgan import data, models
from dcgan.config import compose
from dcgan.distributed import resolve_device
from dcgan.errors import UserError, exit_with
from dcgan.layout import RunFolder
from dcgan.log import read_metrics
from dcgan.train import train

SOURCE_SIDE = 28  # MNIST-family images (and the synthetic ones) are 28x28 grayscale
IDX_IMAGES_MAGIC = 0x00000803


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--data", default="synthetic", choices=["synthetic", "mnist_tiny", "mnist", "fashion_mnist"])
    parser.add_argument("--root", default="data", help="mnist / fashion_mnist: the folder of the IDX files")
    parser.add_argument("--max-images", type=int, default=0, help="use the first N images (0 = all; synthetic: 10000)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100, help="timed training steps of each loop")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (and our metrics-row interval)")
    parser.add_argument("--workers", type=int, default=2, help="the reference's DataLoader workers (its default: 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument(
        "--ours",
        action="append",
        default=None,
        metavar="OVERRIDES",
        help='our trainer with these gan-train overrides, e.g. "trainer.amp=bf16 trainer.channels_last=true"; '
        'repeat for more runs; "" = the defaults (the default)',
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="time each loop this many times, in turns; report the median"
    )
    parser.add_argument("--no-reference", action="store_true", help="time only our trainer")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if min(args.steps, args.warmup, args.batch_size, args.repeat) < 1:
        parser.error("--steps, --warmup, --batch-size and --repeat must be at least 1")
    args.ours = args.ours if args.ours is not None else [""]
    return args


# ---------------------------------------------------------------- data


def source_images(args: argparse.Namespace, folder: Path) -> tuple[np.ndarray, List[str]]:
    """The 28x28 uint8 images both loops train on, and the dataset overrides that make our loader read them."""
    if args.data == "synthetic":
        count = args.max_images or 10000
        images = np.random.default_rng(0).integers(0, 256, size=(count, SOURCE_SIDE, SOURCE_SIDE), dtype=np.uint8)
        write_idx(images, folder / "train-images-idx3-ubyte")
        overrides = ["dataset=mnist", f"dataset.root={folder}", "dataset.download=false"]
    else:
        overrides = [f"dataset={args.data}", f"dataset.max_images={args.max_images}"]
        if args.data != "mnist_tiny":
            overrides += [f"dataset.root={args.root}", "dataset.download=false"]
        native = compose("train", [*overrides, f"dataset.image_size={SOURCE_SIDE}", "dataset.channels=1"]).dataset
        images = data.load_images(native)[:, 0].numpy()
    return images, overrides


def write_idx(images: np.ndarray, path: Path) -> None:
    """An MNIST-format (IDX) image file, so our own loader reads the synthetic images as any data set."""
    count, rows, cols = images.shape
    path.write_bytes(struct.pack(">IIII", IDX_IMAGES_MAGIC, count, rows, cols) + images.tobytes())


class PILImages(Dataset):
    """As torchvision.datasets.MNIST serves images: a uint8 array in memory, a PIL image and the transforms per item."""

    def __init__(self, images: np.ndarray, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index], mode="L")), 0


# ---------------------------------------------------------------- the reference loop


class ReferenceLoop:
    """pytorch/examples dcgan/main.py's training loop, on our networks (D gets the reference's Sigmoid)."""

    real_label, fake_label = 1.0, 0.0

    def __init__(
        self, images: np.ndarray, G: nn.Module, D: nn.Module, args: argparse.Namespace, z_dim: int, device: torch.device
    ):
        transform = transforms.Compose(
            [
                transforms.Resize(args.image_size),
                transforms.ToTensor(),
                transforms.Normalize((0.5,), (0.5,)),
            ]
        )
        torch.backends.cudnn.benchmark = True  # main.py sets it too
        self.dataloader = DataLoader(
            PILImages(images, transform), batch_size=args.batch_size, shuffle=True, num_workers=args.workers
        )
        self.netG, self.netD = G, nn.Sequential(D, nn.Sigmoid())
        self.criterion = nn.BCELoss()
        self.optimizerD = torch.optim.Adam(self.netD.parameters(), lr=0.0002, betas=(0.5, 0.999))
        self.optimizerG = torch.optim.Adam(self.netG.parameters(), lr=0.0002, betas=(0.5, 0.999))
        self.z_dim, self.device = z_dim, device
        self.log = open(os.devnull, "w")  # the reference prints every step; the sync is the cost, not the terminal
        self._batches = iter(())

    def next_batch(self) -> torch.Tensor:
        # A new epoch starts a new iterator (and new worker processes), as `for i, data in enumerate(dataloader)` does.
        try:
            return next(self._batches)[0]
        except StopIteration:
            self._batches = iter(self.dataloader)
            return next(self._batches)[0]

    def step(self, data: torch.Tensor) -> int:
        netD, netG, criterion, device = self.netD, self.netG, self.criterion, self.device
        # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
        netD.zero_grad()
        real_cpu = data.to(device)
        batch_size = real_cpu.size(0)
        label = torch.full((batch_size,), self.real_label, dtype=real_cpu.dtype, device=device)
        output = netD(real_cpu)
        errD_real = criterion(output, label)
        errD_real.backward()
        D_x = output.mean().item()
        noise = torch.randn(batch_size, self.z_dim, 1, 1, device=device)
        fake = netG(noise)
        label.fill_(self.fake_label)
        output = netD(fake.detach())
        errD_fake = criterion(output, label)
        errD_fake.backward()
        D_G_z1 = output.mean().item()
        errD = errD_real + errD_fake
        self.optimizerD.step()
        # (2) Update G network: maximize log(D(G(z)))
        netG.zero_grad()
        label.fill_(self.real_label)  # fake labels are real for generator cost
        output = netD(fake)
        errG = criterion(output, label)
        errG.backward()
        D_G_z2 = output.mean().item()
        self.optimizerG.step()
        print(
            "Loss_D: %.4f Loss_G: %.4f D(x): %.4f D(G(z)): %.4f / %.4f"
            % (errD.item(), errG.item(), D_x, D_G_z1, D_G_z2),
            file=self.log,
        )
        return batch_size

    def images_per_s(self, warmup: int, steps: int) -> float:
        for _ in range(warmup):
            self.step(self.next_batch())
        synchronize(self.device)
        start, images = time.perf_counter(), 0
        for _ in range(steps):
            images += self.step(self.next_batch())
        synchronize(self.device)  # the step's .item() calls already waited; this makes it explicit
        return images / (time.perf_counter() - start)

    def flops_per_image(self) -> float:
        batch = self.next_batch()
        with FlopCounterMode(display=False) as counter:
            self.step(batch)
        return counter.get_total_flops() / len(batch)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- our trainer


def our_config(args: argparse.Namespace, data_overrides: List[str], extra: List[str], max_steps: int, log_every: int):
    return compose(
        "train",
        [
            *data_overrides,
            f"dataset.image_size={args.image_size}",
            "dataset.channels=1",
            f"trainer.device={args.device}",
            f"trainer.batch_size={args.batch_size}",
            f"trainer.max_steps={max_steps}",
            f"trainer.log_every={log_every}",
            "trainer.sample_every=1000000000",
            "trainer.ckpt_every=1000000000",
            "trainer.progress=false",
            *extra,
        ],
    )


def our_images_per_s(args: argparse.Namespace, data_overrides: List[str], extra: List[str], folder: Path) -> float:
    """Run gan-train's train() for warmup + steps; images/s over the metrics rows after the warm-up."""
    run_dir = folder / f"run_{len(list(folder.glob('run_*')))}"
    train(our_config(args, data_overrides, extra, args.warmup + args.steps, args.warmup), run_dir)
    return args.batch_size / seconds_per_step(run_dir, args.warmup, args.batch_size)


def seconds_per_step(run_dir: Path, warmup: int, images_per_step: int) -> float:
    """A finished run's training seconds per step after its first `warmup` steps, from its metrics rows
    (logged every `warmup` steps; images_per_s is rounded to 0.1): start-up, data loading and the last
    checkpoint are not in them. `images_per_step`: batch size x d_steps, as the rows count images."""
    rows = [row for row in read_metrics(RunFolder(run_dir).metrics) if row["step"] > warmup]
    seconds, previous = 0.0, warmup
    for row in rows:  # each row's images_per_s covers the steps since the row before
        seconds += (row["step"] - previous) * images_per_step / row["images_per_s"]
        previous = row["step"]
    return seconds / (previous - warmup)


def our_flops_per_image(args: argparse.Namespace, data_overrides: List[str], extra: List[str], folder: Path) -> float:
    """FLOPs of one step of our loop: a 2-step run minus a 1-step run (start-up, last grid and
    checkpoint are the same in both). Compilation is off: the counter sees the eager operations."""
    eager = [*extra, "trainer.compile=false", "trainer.cuda_graphs=false"]
    totals = []
    for steps in (1, 2):
        with FlopCounterMode(display=False) as counter:
            train(our_config(args, data_overrides, eager, steps, 1), folder / f"flops_{steps}")
        totals.append(counter.get_total_flops())
    return (totals[1] - totals[0]) / args.batch_size


# ---------------------------------------------------------------- main


def run(args: argparse.Namespace) -> Dict[str, Any]:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: List[Dict[str, Any]] = []
    measures: List[Callable[[], float]] = []
    with tempfile.TemporaryDirectory(prefix="dcgan-bench-") as tmp:
        folder = Path(tmp)
        images, data_overrides = source_images(args, folder)
        variants = [shlex.split(text) for text in args.ours]
        our_flops = our_flops_per_image(args, data_overrides, variants[0], folder)
        if not args.no_reference:
            cfg = our_config(args, data_overrides, variants[0], 1, 1)
            torch.manual_seed(0)
            G, D = models.build_generator(cfg, device), models.build_discriminator(cfg, device)
            reference = ReferenceLoop(images, G, D, args, cfg.generator.z_dim, device)
            results.append(
                {
                    "name": "reference (pytorch/examples loop)",
                    "overrides": None,
                    "flops_per_image": reference.flops_per_image(),
                }
            )
            measures.append(lambda: reference.images_per_s(args.warmup, args.steps))
        for overrides in variants:
            results.append(
                {
                    "name": "ours" + (" " + " ".join(overrides) if overrides else " (defaults)"),
                    "overrides": overrides,
                    "flops_per_image": our_flops,
                }
            )
            measures.append(lambda overrides=overrides: our_images_per_s(args, data_overrides, overrides, folder))
        # Round-robin repeats spread a shared machine's load changes evenly over the loops.
        runs: List[List[float]] = [[] for _ in measures]
        for _ in range(args.repeat):
            for samples, measure in zip(runs, measures, strict=False):
                samples.append(measure())
    for result, samples in zip(results, runs, strict=False):
        result["images_per_s"] = statistics.median(samples)
        result["images_per_s_runs"] = samples
    reference_speed = results[0]["images_per_s"] if not args.no_reference else None
    for result in results:
        result["ratio_to_reference"] = result["images_per_s"] / reference_speed if reference_speed else None
        result["tflop_per_s"] = result["images_per_s"] * result["flops_per_image"] / 1e12
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in ["python", "scripts/bench.py", *sys.argv[1:]]),
        "device": describe_device(device),
        "torch": torch.__version__,
        "data": f"{args.data}, {len(images)} images, {SOURCE_SIDE}x{SOURCE_SIDE} resized to "
        f"{args.image_size}x{args.image_size}x1",
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "repeats": args.repeat,
        "results": results,
    }


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} torch threads"


def print_table(report: Dict[str, Any]) -> None:
    print(f"{report['device']}, torch {report['torch']}, {report['date']}")
    print(
        f"data: {report['data']}; batch {report['batch_size']}; {report['timed_steps']} timed steps after "
        f"{report['warmup_steps']} warm-up; median of {report['repeats']} run(s), in turns"
    )
    name_width = max(len(r["name"]) for r in report["results"])
    print(
        f"{'loop':<{name_width}}  {'images/s':>10}  {'(min-max)':>15}  {'x ref':>6}  {'GFLOP/image':>11}  "
        f"{'TFLOP/s':>8}"
    )
    for r in report["results"]:
        ratio = f"{r['ratio_to_reference']:.2f}" if r["ratio_to_reference"] is not None else "-"
        spread = f"{min(r['images_per_s_runs']):.1f}-{max(r['images_per_s_runs']):.1f}"
        print(
            f"{r['name']:<{name_width}}  {r['images_per_s']:>10.1f}  {spread:>15}  {ratio:>6}  "
            f"{r['flops_per_image'] / 1e9:>11.4f}  {r['tflop_per_s']:>8.4f}"
        )


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")  # compile fallbacks show
    try:
        report = run(args)
    except UserError as error:
        exit_with(error, "bench.py")
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
