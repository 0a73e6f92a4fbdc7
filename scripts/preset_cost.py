"""What each preset costs: the data it needs, and seconds per training step on this machine.

A step's arithmetic depends on the preset's networks, image shape and batch size, not on what the
pixels show, so every preset trains here on the real MNIST digits that ship with the package,
resized to its own image size and channel count (a CelebA preset's 64x64x3), with its own batch
size: the time is that of a step on the real data. Each preset runs --warmup steps, then --steps
timed steps, through `dcgan.train.train()` as gan-train does; the time comes from the metrics rows
after the warm-up (scripts/bench.py's `seconds_per_step`), so start-up and the last checkpoint are
not in it. The data sizes are those of the files each data set is read from.

    python scripts/preset_cost.py --device cpu --warmup 1 --steps 2
    python scripts/preset_cost.py --device cuda --warmup 10 --steps 50 --json cost.json

Prints a Markdown table with device, command and date (docs/training.md, "Presets", holds one).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from bench import describe_device, seconds_per_step
from dcgan.config import compose
from dcgan.distributed import resolve_device
from dcgan.errors import UserError, exit_with
from dcgan.train import train

PRESETS = ["tf_dcgan28", "keras_mnist", "keras_fashion", "tf_celeba28", "dcgan64", "keras_celeba64"]
# What each preset's data set is read from (the files torchvision downloads, or Debian's package).
DATA_NEEDED = {
    "mnist": "MNIST: 4 IDX files, 11.6 MB gzipped (70,000 digits)",
    "fashion_mnist": "Fashion-MNIST: 4 IDX files, 30.9 MB gzipped (70,000 images)",
    "celeba": "CelebA: img_align_celeba.zip, 1.44 GB (202,599 faces)",
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated preset names")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (and the metrics-row interval)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per preset")
    parser.add_argument(
        "--overrides", default="", help='gan-train overrides for every preset, e.g. "trainer.amp=true"'
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if min(args.steps, args.warmup) < 1:
        parser.error("--steps and --warmup must be at least 1")
    return args


def preset_config(preset: str, args: argparse.Namespace, steps: int):
    """The preset as published (for its data), and as trained here: on the shipped digits at its own image
    shape and batch size, with --overrides on top."""
    own = compose("train", [f"preset={preset}"])
    return own, compose(
        "train",
        [
            f"preset={preset}",
            "dataset=mnist_tiny",
            f"dataset.image_size={own.dataset.image_size}",
            f"dataset.channels={own.dataset.channels}",
            f"trainer.device={args.device}",
            f"trainer.max_steps={steps}",
            f"trainer.log_every={args.warmup}",
            "trainer.sample_every=1000000000",
            "trainer.ckpt_every=1000000000",
            "trainer.progress=false",
            *shlex.split(args.overrides),
        ],
    )


def measure(preset: str, args: argparse.Namespace, folder: Path) -> Dict[str, Any]:
    own, cfg = preset_config(preset, args, args.warmup + args.steps)
    run_dir = folder / preset
    train(cfg, run_dir)
    shape = f"{cfg.dataset.image_size}x{cfg.dataset.image_size}x{cfg.dataset.channels}"
    return {
        "preset": preset,
        "dataset": own.dataset.name,
        "data_needed": DATA_NEEDED[own.dataset.name],
        "image_shape": shape,
        "batch_size": cfg.trainer.batch_size,
        # A metrics row's images_per_s counts the real images of every D update of its steps.
        "seconds_per_step": seconds_per_step(run_dir, args.warmup, cfg.trainer.batch_size * cfg.trainer.d_steps),
    }


def run(args: argparse.Namespace) -> Dict[str, Any]:
    device = resolve_device(args.device)
    load_average = os.getloadavg()[0]
    presets = [name.strip() for name in args.presets.split(",") if name.strip()]
    with tempfile.TemporaryDirectory(prefix="dcgan-preset-cost-") as tmp:
        results = [measure(preset, args, Path(tmp)) for preset in presets]
    return {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(shlex.quote(a) for a in ["python", "scripts/preset_cost.py", *sys.argv[1:]]),
        "device": describe_device(device),
        "torch": torch.__version__,
        # A shared machine's load slows every step alike; the table says how busy it was.
        "load_average": load_average,
        "cpu_count": os.cpu_count(),
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "results": results,
    }


def markdown(report: Dict[str, Any]) -> str:
    lines = [
        f"Measured on {report['date']}, {report['device']}, torch {report['torch']}: `{report['command']}` "
        f"({report['timed_steps']} timed steps after {report['warmup_steps']} warm-up; load average "
        f"{report['load_average']:.1f} on {report['cpu_count']} cores when it started).",
        "",
        "| preset | data it needs | images | batch | s/step |",
        "|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| `{r['preset']}` | {r['data_needed']} | {r['image_shape']} | {r['batch_size']} | "
            f"{r['seconds_per_step']:.3g} |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    try:
        report = run(args)
    except UserError as error:
        exit_with(error, "preset_cost.py")
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
