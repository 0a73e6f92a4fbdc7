#!/usr/bin/env python
"""Does bf16 cost sample quality? Two gan-train runs that differ only in trainer.amp, then gan-eval's FID of each.

Both runs use one seed, so they see the same images in the same order and start from the same weights; the
only difference is the precision of the networks' passes. `gan-eval` then measures each run's last checkpoint
(EMA generator) against the same reference images. The table printed at the end (and --json) holds the
numbers from gan-eval's JSON stamps; docs/PERFORMANCE.md cites them with this command.

    python scripts/precision_quality.py --steps 300 --batch-size 64 --eval-n 1000 --reference-n 1000

Inception weights: --inception-weights, else $DCGAN_INCEPTION_WEIGHTS, else ../shared/models/ beside the repository.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFAULT_WEIGHTS = REPO.parent / "shared" / "models" / "inception-2015-12-05-fidelity.pth"


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="off,bf16", help="trainer.amp values to compare (default off,bf16)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-n", type=int, default=1000, help="generated images per FID")
    parser.add_argument("--reference-n", type=int, default=1000, help="training images in the reference")
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST's IDX files")
    parser.add_argument("--overrides", default="", help="more gan-train overrides for both runs, space-separated")
    parser.add_argument("--inception-weights", default=os.environ.get("DCGAN_INCEPTION_WEIGHTS", str(DEFAULT_WEIGHTS)))
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "precision_quality")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def run(program: str, args: List[str]) -> float:
    """Run an installed console script; returns its wall time in seconds."""
    started = time.perf_counter()
    result = subprocess.run([str(BIN / program), *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{program} {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def measure(mode: str, args: argparse.Namespace) -> Dict:
    run_dir = args.work / f"amp_{mode}"
    train = [
        "dataset=fashion_mnist",
        f"dataset.root={args.root}",
        f"trainer.amp={mode}",
        f"trainer.seed={args.seed}",
        f"trainer.batch_size={args.batch_size}",
        f"trainer.max_steps={args.steps}",
        f"trainer.ckpt_every={args.steps}",
        f"trainer.sample_every={args.steps}",
        "trainer.progress=false",
        "trainer.overwrite=true",
        *args.overrides.split(),
        f"hydra.run.dir={run_dir}",
    ]
    train_s = run("gan-train", train)
    out = run_dir / "eval.json"
    evaluate = [
        f"ckpt={run_dir / 'checkpoints' / 'last.pt'}",
        f"n={args.eval_n}",
        f"reference_n={args.reference_n}",
        "device=cpu",
        f"inception_weights={args.inception_weights}",
        f"out={out}",
    ]
    run("gan-eval", evaluate)
    results = {r["metric"]: r for r in json.loads(out.read_text())["results"]}
    card = json.loads((run_dir / "run_card.json").read_text())
    return {
        "trainer.amp": mode,
        "precision": card.get("precision"),
        "train_seconds": round(train_s, 1),
        "fid": results["fid"]["value"],
        "kid": results.get("kid", {}).get("value"),
        "stamp": str(out),
    }


def main(argv: List[str] | None = None) -> None:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [measure(mode, args) for mode in args.modes.split(",")]
    report = {
        "command": " ".join(["python", "scripts/precision_quality.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "images_seen": args.steps * args.batch_size,
        "eval_n": args.eval_n,
        "reference_n": args.reference_n,
        "rows": rows,
    }
    print(
        f"{report['command']}\n{report['date']}: {report['images_seen']} images seen per run, FID of {args.eval_n} "
        f"generated vs {args.reference_n} training images"
    )
    for row in rows:
        chosen = (row["precision"] or {}).get("chosen")
        print(
            f"  amp={row['trainer.amp']:<5} ({chosen}): FID {row['fid']:.2f}, KID {row['kid']}, "
            f"training {row['train_seconds']:.0f} s"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
