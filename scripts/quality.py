#!/usr/bin/env python
"""Measure sample quality of the presets, losses and quality options, and write docs/RESULTS.md.

Every run trains for the same budget of images seen (steps x batch size) on Fashion-MNIST (and MNIST when
its files are present), through the installed `gan-train`, then `gan-eval` measures FID and KID of its
EMA generator (and, for the baseline, of the raw generator) against a fixed 10,000-image subset of the
training set. Every number in the report comes from the JSON stamp gan-eval wrote; nothing is
extrapolated. Runs whose checkpoint and stamp already exist are reused, so an interrupted script
continues where it stopped.

    python scripts/quality.py                      # every row at 10,000 images: many hours on two CPU cores
    python scripts/quality.py --budget-images 3200 --eval-n 500 --key-eval-n 2000   # a quicker look
    python scripts/quality.py --table native       # dcgan64, keras_celeba64 (64 px) and tf_celeba28 at their own size
    python scripts/quality.py --gpu [options]      # the recipes at once on one GPU, FID against minutes: quality_gpu.py

The command behind each committed page is written on it.

Inception weights: --inception-weights, else $DCGAN_INCEPTION_WEIGHTS, else ../shared/models/ beside
the repository; with none, torch-fidelity downloads its own copy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from dcgan import checkpoint
from dcgan.layout import RunFolder

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFAULT_WEIGHTS = REPO.parent / "shared" / "models" / "inception-2015-12-05-fidelity.pth"
IDX_TRAIN = "train-images-idx3-ubyte"
REPORTS = {"fashion_mnist": "RESULTS.md", "mnist": "RESULTS_mnist.md"}
NATIVE_REPORTS = {"fashion_mnist": "RESULTS_native.md", "mnist": "RESULTS_mnist_native.md"}


@dataclass
class Row:
    name: str  # also the run folder's name
    label: str  # networks / preset, as shown in the table
    loss: str
    options: str  # what differs from the baseline, in words
    overrides: List[str]
    batch_size: int
    group: str  # preset | loss | option | seed
    ema_off_too: bool = False  # also evaluate the raw generator of this run


NO_MNIST = (
    "its IDX files are not on this machine (only Fashion-MNIST is packaged by Debian here); "
    "the script adds MNIST rows when `--mnist-root` holds them"
)


def rows_for(dataset: str, root: str) -> List[Row]:
    data = [f"dataset={dataset}", f"dataset.root={root}", "dataset.image_size=28", "dataset.channels=1"]
    # The baseline: the package's default networks (the DCGAN of Radford et al., preset dcgan64) at 28 px.
    base = ["preset=dcgan64", *data]
    rows = [
        Row(
            "dcgan_ns",
            "dcgan64 networks @28px",
            "ns",
            "baseline (Adam 2e-4/2e-4, EMA 0.999)",
            base,
            128,
            "preset",
            ema_off_too=True,
        ),
        Row(
            "keras_mnist_ns",
            "keras_mnist",
            "ns (real label 0.9)",
            "preset as published",
            ["preset=keras_mnist", *data],
            128,
            "preset",
        ),
        Row(
            "keras_fashion_ns",
            "keras_fashion",
            "ns",
            "preset as published (RMSprop 1e-3)",
            ["preset=keras_fashion", *data],
            32,
            "preset",
            ema_off_too=True,
        ),
        Row(
            "tf_dcgan28_ns",
            "tf_dcgan28",
            "ns",
            "preset as published",
            ["preset=tf_dcgan28", *data],
            64,
            "preset",
            ema_off_too=True,
        ),
        Row(
            "dcgan_ns_seed1",
            "dcgan64 networks @28px",
            "ns",
            "baseline, seed 1 (seed-to-seed spread)",
            [*base, "trainer.seed=1"],
            128,
            "seed",
            ema_off_too=True,
        ),
        Row(
            "dcgan_hinge",
            "dcgan64 networks @28px",
            "hinge",
            "baseline with hinge loss",
            [*base, "loss=hinge"],
            128,
            "loss",
        ),
        Row(
            "dcgan_lsgan",
            "dcgan64 networks @28px",
            "lsgan",
            "baseline with LSGAN loss",
            [*base, "loss=lsgan"],
            128,
            "loss",
        ),
        Row(
            "dcgan_wgan_gp",
            "dcgan64 networks @28px",
            "wgan_gp",
            "baseline with WGAN-GP (D without BatchNorm)",
            [*base, "loss=wgan_gp", "discriminator.norm=none"],
            128,
            "loss",
        ),
        Row(
            "dcgan_sn",
            "dcgan64 networks @28px",
            "ns",
            "spectral norm in D (instead of BatchNorm)",
            [*base, "discriminator.spectral_norm=true", "discriminator.norm=none"],
            128,
            "option",
        ),
        Row(
            "dcgan_r1",
            "dcgan64 networks @28px",
            "ns",
            "R1 penalty, gamma 1",
            [*base, "loss.r1_weight=1.0"],
            128,
            "option",
        ),
        Row(
            "dcgan_diffaugment",
            "dcgan64 networks @28px",
            "ns",
            "DiffAugment color,translation,cutout",
            [*base, "augment.policy=[color,translation,cutout]"],
            128,
            "option",
        ),
        Row(
            "dcgan_ttur",
            "dcgan64 networks @28px",
            "ns",
            "two time-scales: D lr 4e-4, G lr 1e-4",
            [*base, "optimizer.discriminator.lr=4e-4", "optimizer.generator.lr=1e-4"],
            128,
            "option",
        ),
    ]
    return rows


def native_rows_for(dataset: str, root: str) -> List[Row]:
    """The presets whose published networks are not for 28x28 grayscale, each trained at its own image size.

    Fashion-MNIST stands in for CelebA (one channel; upscaled to 64 px for the 64-pixel presets), so the
    networks and training recipes are measured even where CelebA is not. Each size has its own reference.
    """
    data = [f"dataset={dataset}", f"dataset.root={root}", "dataset.channels=1"]
    return [
        Row(
            "dcgan64_64px",
            "dcgan64 @64px",
            "ns",
            "preset as published (Radford et al.)",
            ["preset=dcgan64", *data, "dataset.image_size=64"],
            128,
            "preset",
        ),
        Row(
            "keras_celeba64_64px",
            "keras_celeba64 @64px",
            "ns",
            "preset as published (MLP discriminator)",
            ["preset=keras_celeba64", *data, "dataset.image_size=64"],
            128,
            "preset",
        ),
        Row(
            "tf_celeba28_28px",
            "tf_celeba28 @28px",
            "ns",
            "preset as published (1024-channel generator, dropout)",
            ["preset=tf_celeba28", *data, "dataset.image_size=28"],
            64,
            "preset",
        ),
    ]


@dataclass
class Measured:
    row: Row
    steps: int
    train_s: float
    results: Dict[str, Dict] = field(
        default_factory=dict
    )  # "ema" / "generator" / "ema@10000" -> {"fid": stamp, "kid": stamp}
    grid: str = ""  # the sample grid, relative to the report


def run(program: str, args: List[str], log_file: Path) -> None:
    started = time.time()
    with open(log_file, "a") as log:
        log.write(f"$ {program} {' '.join(args)}\n")
        log.flush()
        result = subprocess.run([str(BIN / program), *args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"{program} failed (exit {result.returncode}); see {log_file}")
    say(f"  {program} done in {time.time() - started:.0f} s")


def say(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def checkpoint_path(run_dir: Path, step: Optional[int] = None) -> Path:
    """A run's last checkpoint, or its checkpoint at `step`."""
    return RunFolder(run_dir).checkpoints / (checkpoint.LAST if step is None else checkpoint.step_name(step))


def train_row(row: Row, budget_images: int, work: Path, points: int = 1) -> Measured:
    """Train `row` for the budget; with `points` > 1, checkpoints at `points` evenly spaced steps are all kept."""
    run_dir = work / row.name
    steps = max(points, budget_images // row.batch_size // points * points)
    ckpt_every = min(100, steps) if points == 1 else steps // points
    last = checkpoint_path(run_dir)
    timing = run_dir / "train_seconds.json"
    if last.is_file() and timing.is_file() and json.loads(timing.read_text())["steps"] == steps:
        say(f"{row.name}: reusing {last}")
    else:
        say(f"{row.name}: training {steps} steps x {row.batch_size} images")
        # A killed run continues from its last checkpoint (resume is exact), and its time so far is kept.
        partial = run_dir / "train_seconds.partial"
        spent = float(partial.read_text()) if partial.is_file() else 0.0
        started = time.time()
        try:
            run(
                "gan-train",
                [
                    *row.overrides,
                    f"trainer.batch_size={row.batch_size}",
                    f"trainer.max_steps={steps}",
                    "trainer.device=cpu",
                    "trainer.progress=false",
                    "trainer.log_every=25",
                    f"trainer.sample_every={steps}",
                    f"trainer.ckpt_every={ckpt_every}",
                    f"trainer.keep_last={points + 1}",
                    "trainer.resume=auto",
                    f"hydra.run.dir={run_dir}",
                ],
                work / f"{row.name}.log",
            )
        except BaseException:
            run_dir.mkdir(parents=True, exist_ok=True)
            partial.write_text(str(spent + time.time() - started))
            raise
        timing.write_text(json.dumps({"steps": steps, "seconds": round(spent + time.time() - started, 1)}))
    return Measured(row, steps, json.loads(timing.read_text())["seconds"])


def evaluate(
    measured: Measured,
    key: str,
    n: int,
    ema: bool,
    args,
    work: Path,
    step: Optional[int] = None,
    extra: Sequence[str] = (),
) -> Dict[str, Dict]:
    """FID/KID of the run's last checkpoint (or of its checkpoint at `step`), stored under `key` (last only).

    `extra`: more gan-eval overrides, e.g. another reference split.
    """
    ckpt = checkpoint_path(work / measured.row.name, step)
    folder = ckpt.parent
    step = measured.steps if step is None else step
    out = folder / (
        f"eval-{key.replace('@', '-')}.json"
        if step == measured.steps
        else f"eval-{key.replace('@', '-')}-step{step}.json"
    )
    fresh = out.is_file() and all(
        r["generated"]["count"] == n and r["generated"]["step"] == step for r in json.loads(out.read_text())["results"]
    )
    if not fresh:
        say(f"{measured.row.name}: gan-eval {key} at step {step} with {n} images")
        weights = [f"inception_weights={args.inception_weights}"] if args.inception_weights else []
        run(
            "gan-eval",
            [
                f"ckpt={ckpt}",
                f"n={n}",
                f"reference_n={args.reference_n}",
                f"ema={str(ema).lower()}",
                "device=cpu",
                f"out={out}",
                *weights,
                *extra,
            ],
            work / f"{measured.row.name}.log",
        )
    results = {r["metric"]: r for r in json.loads(out.read_text())["results"]}
    if step == measured.steps:
        measured.results[key] = results
    return results


@dataclass
class Curve:
    """One long baseline run, evaluated at evenly spaced checkpoints with and without EMA."""

    measured: Measured
    seed: int
    points: Dict[int, Dict[str, Dict]]  # step -> {"ema": {"fid": stamp, ...}, "generator": {...}}


def ema_study(dataset: str, root: str, args, work: Path) -> List[Curve]:
    """Does the EMA generator beat the raw one over a longer run? The baseline with several seeds, paired per
    checkpoint.

    EMA only watches training (it never feeds back), so each run gives both curves; the comparison is paired.
    """
    base = next(r for r in rows_for(dataset, root) if r.name == "dcgan_ns")
    work.mkdir(parents=True, exist_ok=True)
    curves = []
    for seed in [int(s) for s in args.ema_seeds.split(",") if s.strip()]:
        row = Row(
            f"ema_study_seed{seed}",
            base.label,
            base.loss,
            f"baseline, seed {seed}, longer",
            [*base.overrides, "trainer.ema=0.999", f"trainer.seed={seed}"],
            base.batch_size,
            "ema",
        )
        m = train_row(row, args.ema_budget_images, work, points=args.ema_points)
        steps = [m.steps * (i + 1) // args.ema_points for i in range(args.ema_points)]
        points = {
            step: {
                "ema": evaluate(m, "ema", args.eval_n, True, args, work, step),
                "generator": evaluate(m, "generator", args.eval_n, False, args, work, step),
            }
            for step in reversed(steps)
        }
        curves.append(Curve(m, seed, dict(sorted(points.items()))))
    return curves


def real_floor(dataset: str, root: str, n: int, args, work: Path, image_size: int = 28) -> Optional[Dict[str, Dict]]:
    """FID/KID of `n` real test-split images against the same training reference.

    What a perfect generator scores at this n."""
    from dcgan.config import compose
    from dcgan.data import load_images
    from dcgan.images import to_pil
    from dcgan.metrics import seeded_subset

    data = [f"dataset={dataset}", f"dataset.root={root}", f"dataset.image_size={image_size}"]
    name = f"real-{dataset}-test-{n}" + (f"-{image_size}px" if image_size != 28 else "")
    folder, out = work / name, work / f"{name}.json"
    if not out.is_file():
        say(f"real-data floor: {n} test images of {dataset} at {image_size} px")
        # Resized by the loader, as the training images and the reference at this size are.
        test = load_images(compose("train", [*data, "dataset.split=test"]).dataset)
        folder.mkdir(parents=True, exist_ok=True)
        for i in seeded_subset(len(test), n, 0).tolist():
            to_pil(test[i]).save(folder / f"{i:05d}.png")
        weights = [f"inception_weights={args.inception_weights}"] if args.inception_weights else []
        run(
            "gan-eval",
            [
                f"input1={folder}",
                *data,
                f"n={n}",
                f"reference_n={args.reference_n}",
                "device=cpu",
                f"out={out}",
                *weights,
            ],
            work / "real-floor.log",
        )
    return {r["metric"]: r for r in json.loads(out.read_text())["results"]}


def sample_grid(measured: Measured, dataset: str, docs: Path, work: Path) -> str:
    grid = docs / "results" / f"{dataset}_{measured.row.name}.png"
    run(
        "gan-sample",
        [
            f"ckpt={checkpoint_path(work / measured.row.name)}",
            "mode=grid",
            "n=64",
            "nrow=8",
            f"out={grid}",
            "device=cpu",
        ],
        work / f"{measured.row.name}.log",
    )
    return f"results/{grid.name}"


# ---------------------------------------------------------------- the report


def fid_kid(results: Dict[str, Dict]) -> str:
    return f"{results['fid']['value']:.1f} | {1000 * results['kid']['value']:.1f} ± {1000 * results['kid']['std']:.1f}"


def counts_and_time(stamp: Dict, split: bool = False) -> str:
    """The 'generated / reference | eval time' cells of one stamp; the time says when it includes computing the
    reference statistics (the first evaluation against a reference) rather than reading them from the cache."""
    reference = f"{stamp['reference']['count']:,}" + (f" {stamp['reference']['split']}" if split else "")
    computed = " (with reference)" if stamp["protocol"].get("reference_features") == "computed" else ""
    return f"{stamp['generated']['count']:,} / {reference} | {stamp['seconds'] / 60:.0f} min{computed}"


def write_report(
    dataset: str,
    measured: List[Measured],
    floor: Dict[str, Dict],
    key_rows: List[Measured],
    key_floor: Optional[Dict[str, Dict]],
    curves: List[Curve],
    args,
    command: str,
    started: datetime.datetime,
    out: Path,
) -> Path:
    base = next(m for m in measured if m.row.name == "dcgan_ns")
    seed1 = next((m for m in measured if m.row.group == "seed"), None)
    spread = abs(base.results["ema"]["fid"]["value"] - seed1.results["ema"]["fid"]["value"]) if seed1 else None
    lines = report_header(dataset, measured, floor, key_rows, key_floor, args, command, started)
    lines += runs_table(measured, floor, key_rows, key_floor, args)
    best = min(measured, key=lambda m: m.results["ema"]["fid"]["value"])
    lines += [
        "",
        f"Sample grid of the best run by FID (`{best.row.name}`, EMA generator, seeds 0-63):",
        "",
        f"![{best.row.name}]({best.grid})",
        "",
    ]
    lines += ema_section(curves, args)
    lines += defaults_section(measured, base, spread, curves)
    lines += published_section(dataset, curves, args)
    lines += left_out_section(dataset, measured, key_rows, args)
    out.write_text("\n".join(lines) + "\n")
    return out


def report_header(
    dataset: str,
    measured: List[Measured],
    floor: Dict[str, Dict],
    key_rows: List[Measured],
    key_floor: Optional[Dict[str, Dict]],
    args,
    command: str,
    started: datetime.datetime,
) -> List[str]:
    """RESULTS.md's title and the facts every number below depends on: command, device, data, budget, metrics."""
    import torch

    any_stamp = measured[0].results["ema"]["fid"]
    protocol = any_stamp["protocol"]
    reference = any_stamp["reference"]
    # Runs are reused across invocations, so report the time the measurements themselves took.
    train_minutes = sum(m.train_s for m in measured) / 60
    stamps = (
        [r for m in measured for res in m.results.values() for r in res.values()]
        + list((floor or {}).values())
        + list((key_floor or {}).values())
    )
    eval_minutes = (
        sum(
            {
                (r["generated"]["source"], r["generated"].get("weights"), r["generated"]["count"]): r["seconds"]
                for r in stamps
            }.values()
        )
        / 60
    )
    return [
        "# Sample quality: measured",
        "",
        f"Generated by `scripts/quality.py` on {started:%Y-%m-%d}: {train_minutes:.0f} min of training and "
        f"{eval_minutes:.0f} min of",
        "evaluation. Every number below comes from a `gan-eval` JSON stamp written beside its checkpoint; nothing is",
        "extrapolated. The only numbers not measured here are the published ones, in a section of their own.",
        "",
        f"- **Command:** `{command}`",
        f"- **Device:** CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}; "
        "the cores were shared with other jobs, so times are indicative only.",
        f"- **Data:** {dataset} from `{reference['root']}`, 28x28, one channel.",
        f"- **Budget:** {args.budget_images:,} training images seen per run (steps x batch size; one D and one G "
        "update per step), "
        "from scratch, seed 0 unless stated.",
        f"- **Metrics:** FID and KID by {protocol['library']}, {protocol['feature_extractor']}; {protocol['resize']}; "
        f"grayscale as {protocol['grayscale']}. Weights `{Path(protocol['weights_file']).name}` (sha256 "
        f"`{protocol['weights_sha256'][:16]}...`).",
        f"- **Reference:** {reference['count']:,} images of the {reference['split']} split ({reference['selection']}); "
        f"generated: latent seeds 0..n-1 from the EMA generator unless stated.",
        f"- **Counts:** the table uses n = {args.eval_n:,} generated images per row, so its FIDs compare with each "
        "other but sit "
        f"above 10,000-image FIDs (FID is biased upward at small n; KID is not)."
        + (f" The key rows are repeated with {args.key_eval_n:,} images below." if key_rows else ""),
        "",
    ]


def runs_table(
    measured: List[Measured],
    floor: Dict[str, Dict],
    key_rows: List[Measured],
    key_floor: Optional[Dict[str, Dict]],
    args,
) -> List[str]:
    """Every run at --eval-n beside the real-data floor, then the key runs at --key-eval-n beside theirs."""
    reference = measured[0].results["ema"]["fid"]["reference"]
    lines = [
        f"## All runs ({args.eval_n:,} generated vs {reference['count']:,} reference images)",
        "",
        "| run | networks | loss | what differs | steps x batch | train time | FID | KID x 10^3 (± std over subsets) | "
        "FID, EMA off | grid |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in measured:
        r = m.row
        raw = f"{m.results['generator']['fid']['value']:.1f}" if "generator" in m.results else ""
        lines.append(
            f"| `{r.name}` | {r.label} | {r.loss} | {r.options} | {m.steps} x {r.batch_size} | "
            f"{m.train_s / 60:.1f} min "
            f"| {fid_kid(m.results['ema'])} | {raw} | [png]({m.grid}) |"
        )
    if floor:
        lines.append(
            f"| real data | - | - | {floor['fid']['generated']['count']:,} real **test** images (the floor at "
            "this n) | - | - "
            f"| {fid_kid(floor)} | | |"
        )
    if key_rows:
        lines += [
            "",
            f"## Key runs at {args.key_eval_n:,} generated images",
            "",
            "| run | what differs | FID | KID x 10^3 | generated / reference | eval time |",
            "|---|---|---|---|---|---|",
        ]
    for m in key_rows:
        res = m.results[f"ema@{args.key_eval_n}"]
        lines.append(f"| `{m.row.name}` | {m.row.options} | {fid_kid(res)} | {counts_and_time(res['fid'])} |")
    if key_floor:
        lines.append(
            f"| real data | {key_floor['fid']['generated']['count']:,} real **test** images (the floor at "
            f"this n) | {fid_kid(key_floor)} | "
            f"{counts_and_time(key_floor['fid'])} |"
        )
    return lines


def left_out_section(dataset: str, measured: List[Measured], key_rows: List[Measured], args) -> List[str]:
    # Whole gan-eval calls with the reference cached; the largest n measured, where fixed costs weigh least.
    timed = max((m.results[k]["fid"] for m in measured for k in m.results), key=lambda r: r["generated"]["count"])
    rate = timed["generated"]["count"] / timed["seconds"]
    return [
        "## Left out, and why",
        "",
        "- **dcgan64 and keras_celeba64 at 64x64, tf_celeba28's 1024-channel networks:** on "
        f"[{NATIVE_REPORTS[dataset]}]({NATIVE_REPORTS[dataset]})",
        "  (`--table native`), each at its own image size, with Fashion-MNIST standing in for CelebA, which is not on "
        "this",
        "  machine. The dcgan64 *networks* are also measured at 28x28 here (the baseline rows).",
        f"- **MNIST:** {'measured above' if dataset == 'mnist' else NO_MNIST}.",
        *(
            [
                "- **10,000 generated images for every row (the standard protocol, and this script's default):** "
                "at the "
                f"{rate:.0f} images/s gan-eval reached here, that is ~{10000 * len(measured) / rate / 3600:.1f} h of "
                f"evaluation for the table alone; the rows use {args.eval_n:,}"
                + (f", and {len(key_rows)} key row(s) {args.key_eval_n:,}." if key_rows else ".")
            ]
            if args.eval_n < 10000
            else []
        ),
        "- **Several seeds per row, longer budgets, R1 gamma and DiffAugment tuning:** one seed per row (two for the "
        "baseline) at",
        "  the short budget, and only the EMA question asked over a longer run, is what two CPU cores allow in a "
        "session; treat",
        "  differences smaller than the seed spread as noise. SN, R1, DiffAugment and TTUR stay off by default because "
        "they did",
        "  not beat the baseline here; DiffAugment is meant for small data sets, which 60,000 images is not.",
        "",
    ]


def write_native_report(
    dataset: str,
    measured: List[Measured],
    floors: Dict[int, Dict[str, Dict]],
    args,
    command: str,
    started: datetime.datetime,
    out: Path,
) -> Path:
    """The presets made for other sizes than 28x28 grayscale, each at its own size.

    A page of its own beside RESULTS.md."""
    import torch

    if not measured:
        raise SystemExit("no native-size rows were measured (check --only)")
    first = measured[0].results["ema"]["fid"]
    protocol, reference = first["protocol"], first["reference"]
    train_minutes = sum(m.train_s for m in measured) / 60
    eval_minutes = sum(r["fid"]["seconds"] for r in [*(m.results["ema"] for m in measured), *floors.values()]) / 60
    lines = [
        "# Sample quality of the presets at their own image size: measured",
        "",
        f"Generated by `scripts/quality.py --table native` on {started:%Y-%m-%d}: {train_minutes:.0f} min of training "
        "and "
        f"{eval_minutes:.0f} min of evaluation (reference statistics included where computed). Every number",
        "below comes from a `gan-eval` JSON stamp written beside its checkpoint; nothing is extrapolated.",
        f"The 28x28 presets, the losses and the quality options are on [RESULTS.md]({REPORTS[dataset]}).",
        "",
        f"- **Command:** `{command}`",
        f"- **Device:** CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}; "
        "times are indicative only.",
        f"- **Data:** {dataset} from `{reference['root']}`, one channel (`dataset.channels=1`: the CelebA presets' "
        "three",
        "  output channels become one), standing in for CelebA, which is not on this machine: the presets' networks "
        "and",
        "  training recipes are measured, on other images than they were published for. The 64-pixel",
        "  rows see the 28x28 images upscaled once by the loader (bilinear, antialiased), training and reference "
        "alike.",
        f"- **Budget:** {args.budget_images:,} training images seen per run (steps x batch size; one D and one G "
        "update per step), "
        "from scratch, seed 0, as on RESULTS.md.",
        f"- **Metrics:** FID and KID by {protocol['library']}, {protocol['feature_extractor']}; {protocol['resize']}; "
        f"grayscale as {protocol['grayscale']}. Weights `{Path(protocol['weights_file']).name}` (sha256 "
        f"`{protocol['weights_sha256'][:16]}...`).",
        f"- **Reference:** per image size, {reference['count']:,} images of the {reference['split']} split "
        f"({reference['selection']}), "
        "resized as the run's training data; generated: latent seeds 0..n-1 from the EMA generator.",
        "",
        "| run | networks | what differs | image size | steps x batch | train time | FID | KID x 10^3 (± std over "
        "subsets) | generated / reference | eval time | grid |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in measured:
        res = m.results["ema"]
        size = res["fid"]["generated"]["image_size"]
        lines.append(
            f"| `{m.row.name}` | {m.row.label} | {m.row.options} | {size}x{size} | {m.steps} x "
            f"{m.row.batch_size} | "
            f"{m.train_s / 60:.1f} min | {fid_kid(res)} | {counts_and_time(res['fid'])} | [png]({m.grid}) |"
        )
    for size, floor in sorted(floors.items()):
        lines.append(
            f"| real data | - | {floor['fid']['generated']['count']:,} real **test** images (the floor at "
            f"this n) | {size}x{size} | - | - "
            f"| {fid_kid(floor)} | {counts_and_time(floor['fid'])} | |"
        )
    lines += [
        "",
        "How to read it:",
        "- A 28x28 row here uses RESULTS.md's 28-px reference (same split, subset and seed), so it compares "
        "directly with",
        "  RESULTS.md's rows of the same budget and n (the key rows, when both are 64,000 images and 10,000 vs "
        "10,000).",
        "- The 64x64 rows compare with each other only: their reference is the upscaled images, a different "
        "distribution,",
        "  and FID is not comparable across reference sets; the real-data row is their floor (RESULTS.md has the "
        "28-px one).",
        "",
    ]
    for m in measured:
        lines += [f"`{m.row.name}` (EMA generator, seeds 0-63):", "", f"![{m.row.name}]({m.grid})", ""]
    lines += [
        "## Left out, and why",
        "",
        "- **CelebA itself:** not on this machine; the presets run unchanged on it (`gan-train preset=dcgan64`, "
        "which selects",
        "  `dataset=celeba`), and `gan-eval` then measures against CelebA's own reference.",
        "- **Several seeds, EMA off, longer budgets:** one seed per row at the short budget, as on RESULTS.md.",
        "",
    ]
    out.write_text("\n".join(lines) + "\n")
    return out


def args_epochs(curves: List[Curve]) -> str:
    c = curves[0].measured
    return f"{c.steps * c.row.batch_size / 60000:.0f}"


def ema_verdict(curves: List[Curve]) -> Optional[str]:
    """What the longer runs say at their last checkpoint: mean paired FID difference and how many seeds EMA won."""
    if not curves:
        return None
    last = [c.points[max(c.points)] for c in curves]
    diffs = [p["ema"]["fid"]["value"] - p["generator"]["fid"]["value"] for p in last]
    wins = sum(d < 0 for d in diffs)
    mean = sum(diffs) / len(diffs)
    word = "helps" if wins == len(diffs) and mean < 0 else "hurts" if wins == 0 and mean > 0 else "is mixed"
    return f"EMA {word}: FID {mean:+.1f} on average with EMA, better in {wins} of {len(diffs)} seeds"


def ema_section(curves: List[Curve], args) -> List[str]:
    if not curves:
        return []
    seeds = ", ".join(str(c.seed) for c in curves)
    lines = [
        "## EMA of the generator over a longer run",
        "",
        f"The baseline (`dcgan_ns`'s settings, trainer.ema=0.999) trained for {args.ema_budget_images:,} images "
        f"(~{args.ema_budget_images / 60000:.0f} epochs) with seeds {seeds}; each kept checkpoint is evaluated "
        "twice, with the EMA "
        f"generator and with the raw one ({args.eval_n:,} generated images each). EMA never feeds back into "
        "training, so "
        "the two columns of a seed come from the same run: a paired comparison.",
        "",
        "| images seen | " + " | ".join(f"seed {c.seed}: FID EMA / raw" for c in curves) + " | mean (EMA - raw) |",
        "|---|" + "---|" * len(curves) + "---|",
    ]
    for step in sorted(curves[0].points):
        cells, diffs = [], []
        for c in curves:
            p = c.points[step]
            ema, raw = p["ema"]["fid"]["value"], p["generator"]["fid"]["value"]
            cells.append(f"{ema:.1f} / {raw:.1f}")
            diffs.append(ema - raw)
        lines.append(
            f"| {step * curves[0].measured.row.batch_size:,} | "
            + " | ".join(cells)
            + f" | {sum(diffs) / len(diffs):+.1f} |"
        )
    train_min = sum(c.measured.train_s for c in curves) / 60
    lines += ["", f"At the last checkpoint: {ema_verdict(curves)} ({train_min:.0f} min of training in all).", ""]
    return lines


def defaults_section(
    measured: List[Measured], base: Measured, spread: Optional[float], curves: List[Curve]
) -> List[str]:
    base_fid = base.results["ema"]["fid"]["value"]
    noise = f"{spread:.1f}" if spread is not None else "unknown"
    lines = [
        "## What the defaults follow",
        "",
        f"Each option is compared with the baseline `{base.row.name}` (FID {base_fid:.1f}); the two baseline "
        "seeds differ by "
        f"{noise} FID, the yardstick for noise.",
        "",
    ]
    if curves:
        lines.append(
            f"- **EMA of G (trainer.ema=0.999) over ~{args_epochs(curves)} epochs, {len(curves)} seeds (the "
            f"table above):** {ema_verdict(curves)}. "
            "The default follows these longer runs, which are closer to real use; the short-budget rows below "
            "show where "
            "EMA can lag while the generator still changes fast."
        )
    for m in measured:
        if "generator" not in m.results:
            continue
        ema, raw = m.results["ema"]["fid"]["value"], m.results["generator"]["fid"]["value"]
        verdict = (
            "helps" if ema < raw - (spread or 0) else ("hurts" if ema > raw + (spread or 0) else "is within noise")
        )
        lines.append(
            f"- **EMA of G (trainer.ema=0.999), `{m.row.name}`, {m.steps * m.row.batch_size:,} images:** FID "
            f"{ema:.1f} with EMA vs {raw:.1f} without: EMA {verdict}."
        )
    for m in measured:
        if m.row.group != "option":
            continue
        fid = m.results["ema"]["fid"]["value"]
        delta = fid - base_fid
        verdict = "better" if delta < -(spread or 0) else "worse" if delta > (spread or 0) else "within noise"
        lines.append(f"- **{m.row.options}:** FID {fid:.1f} ({delta:+.1f}): {verdict}.")
    lines.append("")
    return lines


# Lucic et al. 2018, Table 2, MNIST and Fashion-MNIST columns: (loss, our loss, MNIST, Fashion-MNIST). Copied from two
# later papers that reprint the table with attribution (the original was not readable offline); the two reprints agree
# on every cell kept here, and disagree on two CIFAR-10/CelebA cells, which are left out.
LUCIC_2018 = [
    ("MM GAN", "", "9.8 ± 0.9", "29.6 ± 1.6"),
    ("NS GAN", "ns", "6.8 ± 0.5", "26.5 ± 1.6"),
    ("LSGAN", "lsgan", "7.8 ± 0.6", "30.7 ± 2.2"),
    ("WGAN", "", "6.7 ± 0.4", "21.5 ± 1.6"),
    ("WGAN GP", "wgan_gp", "20.3 ± 5.0", "24.5 ± 2.1"),
    ("DRAGAN", "", "7.6 ± 0.4", "27.7 ± 1.2"),
]


def published_section(dataset: str, curves: List[Curve], args) -> List[str]:
    column = {"mnist": 2, "fashion_mnist": 3}[dataset]
    key = f"ema@{args.key_eval_n}-test"
    ours = [c for c in curves if key in c.measured.results]
    lines = [
        "## Published numbers beside ours",
        "",
        "Lucic, Kurach, Michalski, Gelly & Bousquet 2018, *Are GANs Created Equal? A Large-Scale Study* (NeurIPS; "
        "arXiv:1711.10337),",
        "Table 2: the best FID each loss reached after a wide hyperparameter search, InfoGAN-style networks, ± as "
        "printed there.",
        "The values are copied from two later papers that reprint that table with attribution, Dai & Wipf 2019 "
        "(*Diagnosing and",
        "Enhancing VAE Models*, ICLR, Table 1) and Zhang & Khoreva 2019 (*Progressive Augmentation of GANs*, NeurIPS, "
        "Table 2),",
        "because the original could not be opened when this page was written; the two reprints agree on every cell "
        "below.",
        "",
        f"| loss in Lucic et al. | our `loss=` | their FID, {dataset} |",
        "|---|---|---|",
    ]
    lines += [f"| {row[0]} | {f'`{row[1]}`' if row[1] else '-'} | {row[column]} |" for row in LUCIC_2018]
    if ours:
        lines += [
            "",
            f"Ours measured their way ({args.key_eval_n:,} generated images against {args.reference_n:,} "
            "images of the **test** split), "
            f"the `ns` baseline of the EMA study above after {args.ema_budget_images:,} images "
            f"(~{args.ema_budget_images / 60000:.0f} epochs), "
            "EMA generator, no hyperparameter search:",
            "",
            "| run | loss | images seen | FID | KID x 10^3 | generated / reference | eval time |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in ours:
            res = c.measured.results[key]
            lines.append(
                f"| `{c.measured.row.name}` | ns | {c.measured.steps * c.measured.row.batch_size:,} | "
                f"{fid_kid(res)} | "
                f"{counts_and_time(res['fid'], split=True)} |"
            )
    lines += [
        "",
        "Their protocol (google/compare_gan v1, `eval_gan_lib.py`): 10,000 generated images against 10,000 images of "
        "the",
        "**test** split, TensorFlow's Inception (tf.gan, pool features, bilinear resize to 299 px), grayscale tiled to "
        "three",
        "channels; the reprint by Zhang & Khoreva gives the training length as 20 epochs for MNIST and Fashion-MNIST.",
        "",
        "Where ours differs, plainly:",
        "- **Training:** our closest rows are the `ns` runs just above, ~10 epochs with the package's defaults and no "
        "search;",
        "  theirs are the best of a search, trained 20 epochs. The rows of the first table (64,000 images, about one "
        "epoch, against",
        "  a training-split reference) are for comparing our options with each other, not with this table.",
        "- **Reference split:** the first tables compare with a 10,000-image subset of the **training** split; the "
        "rows just above",
        "  use the test split, as they did. The real-data rows (test images against our training reference) show how "
        "far apart",
        "  the two splits sit.",
        "- **Inception port:** the same 2015-12-05 weights, run by torch-fidelity in PyTorch; torch-fidelity matches "
        "the",
        "  TensorFlow implementation closely but not bit for bit.",
        "- **Networks:** the DCGAN of Radford et al. at 28 px and the presets' published networks, not the study's "
        "InfoGAN networks.",
        "",
    ]
    return lines


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-images", type=int, default=64000, help="training images seen per run (default 64000)")
    parser.add_argument(
        "--eval-n", type=int, default=10000, help="generated images per row (default 10000, the standard protocol)"
    )
    parser.add_argument(
        "--key-eval-n", type=int, default=10000, help="generated images for the key rows (default 10000)"
    )
    parser.add_argument(
        "--reference-n", type=int, default=10000, help="reference images from the training split (default 10000)"
    )
    parser.add_argument(
        "--key-rows", default="best", help="rows re-evaluated at --key-eval-n: names, or 'best' (default: best)"
    )
    parser.add_argument(
        "--ema-seeds", default="0,1", help="seeds of the longer EMA-vs-raw baseline runs; empty to skip (default 0,1)"
    )
    parser.add_argument(
        "--ema-budget-images",
        type=int,
        default=601600,
        help="images seen by each EMA study run (default 601600, ~10 epochs)",
    )
    parser.add_argument(
        "--protocol-seeds",
        default="",
        help="EMA study seeds also measured at the published protocol, "
        "key-eval-n images vs the test split (default: all)",
    )
    parser.add_argument(
        "--ema-points", type=int, default=2, help="evenly spaced checkpoints evaluated per EMA study run (default 2)"
    )
    parser.add_argument(
        "--table",
        choices=["main", "native"],
        default="main",
        help="main: every preset, loss and option at 28x28 (RESULTS.md); native: the presets made for "
        "other sizes, each at its own (RESULTS_native.md)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma list of run names to measure (in the main table the baseline dcgan_ns is always included)",
    )
    parser.add_argument(
        "--fashion-root", default="/usr/share/datasets/fashion-mnist", help="folder with Fashion-MNIST's IDX files"
    )
    parser.add_argument(
        "--mnist-root", default="data/MNIST/raw", help="folder with MNIST's IDX files; skipped when absent"
    )
    parser.add_argument(
        "--inception-weights",
        default=os.environ.get("DCGAN_INCEPTION_WEIGHTS", str(DEFAULT_WEIGHTS) if DEFAULT_WEIGHTS.is_file() else ""),
    )
    parser.add_argument("--work", default=str(REPO / "outputs" / "quality"), help="run folders (reused when present)")
    parser.add_argument("--docs", default=str(REPO / "docs"))
    return parser.parse_args()


def main() -> None:
    if "--gpu" in sys.argv[1:]:  # the GPU study: its own options and its own module
        import quality_gpu

        sys.exit(quality_gpu.main([a for a in sys.argv[1:] if a != "--gpu"]))
    args = parse_args()
    command = "python scripts/quality.py " + " ".join(sys.argv[1:])
    started = datetime.datetime.now()
    work, docs = Path(args.work), Path(args.docs)
    work.mkdir(parents=True, exist_ok=True)
    (docs / "results").mkdir(parents=True, exist_ok=True)
    say(f"inception weights: {args.inception_weights or 'torch-fidelity download'}")

    datasets = [("fashion_mnist", args.fashion_root)]
    if any((Path(args.mnist_root) / f"{IDX_TRAIN}{suffix}").is_file() for suffix in ("", ".gz")):
        datasets.append(("mnist", args.mnist_root))
    else:
        say(f"MNIST: no {IDX_TRAIN}[.gz] in {args.mnist_root}; its rows are skipped")
    for dataset, root in datasets:
        runs = work / f"{dataset}-{args.budget_images}"  # one folder per budget: runs are reused only within it
        runs.mkdir(parents=True, exist_ok=True)
        if args.table == "native":
            native_table(dataset, root, args, work, runs, docs, command, started)
        else:
            main_table(dataset, root, args, work, runs, docs, command, started)


def wanted_rows(args, native: bool) -> set:
    """--only's run names; the main table always keeps its baseline, the yardstick of every option row."""
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    return only | ({"dcgan_ns"} if only and not native else set())


def measure_rows(rows: List[Row], wanted: set, dataset: str, args, runs: Path, docs: Path) -> List[Measured]:
    """Train and evaluate each wanted row (all when none is named), and draw its sample grid."""
    measured = []
    for row in rows:
        if wanted and row.name not in wanted:
            continue
        m = train_row(row, args.budget_images, runs)
        evaluate(m, "ema", args.eval_n, True, args, runs)
        if row.ema_off_too:
            evaluate(m, "generator", args.eval_n, False, args, runs)
        m.grid = sample_grid(m, dataset, docs, runs)
        measured.append(m)
    return measured


def native_table(
    dataset: str, root: str, args, work: Path, runs: Path, docs: Path, command: str, started: datetime.datetime
) -> None:
    measured = measure_rows(native_rows_for(dataset, root), wanted_rows(args, native=True), dataset, args, runs, docs)
    # RESULTS.md measures the 28-px floor; the other sizes get theirs here, against the same reference as their rows.
    sizes = sorted({m.results["ema"]["fid"]["generated"]["image_size"] for m in measured} - {28})
    floors = {size: real_floor(dataset, root, args.eval_n, args, work, image_size=size) for size in sizes}
    say(
        "wrote "
        f"{write_native_report(dataset, measured, floors, args, command, started, docs / NATIVE_REPORTS[dataset])}"
    )


def main_table(
    dataset: str, root: str, args, work: Path, runs: Path, docs: Path, command: str, started: datetime.datetime
) -> None:
    ema_work = work / f"{dataset}-ema-{args.ema_budget_images}"
    curves = ema_study(dataset, root, args, ema_work) if args.ema_seeds.strip() else []
    measured = measure_rows(rows_for(dataset, root), wanted_rows(args, native=False), dataset, args, runs, docs)
    floor = real_floor(dataset, root, args.eval_n, args, work)
    key_rows = evaluate_key_rows(measured, args, runs)
    # The longer runs once more, as the published numbers were measured: n generated vs the whole test split.
    test = [f"dataset={dataset}", f"dataset.root={root}", "dataset.split=test"]
    protocol_seeds = (
        {int(x) for x in args.protocol_seeds.split(",") if x.strip()}
        if args.protocol_seeds
        else {c.seed for c in curves}
    )
    for c in (c for c in curves if c.seed in protocol_seeds):
        evaluate(c.measured, f"ema@{args.key_eval_n}-test", args.key_eval_n, True, args, ema_work, extra=test)
    key_floor = real_floor(dataset, root, args.key_eval_n, args, work) if key_rows else None
    out = write_report(
        dataset, measured, floor, key_rows, key_floor, curves, args, command, started, docs / REPORTS[dataset]
    )
    say(f"wrote {out}")


def evaluate_key_rows(measured: List[Measured], args, runs: Path) -> List[Measured]:
    """--key-rows (names, or 'best' by FID) once more at --key-eval-n generated images."""
    wanted = [name.strip() for name in args.key_rows.split(",") if name.strip()]
    best = min(measured, key=lambda m: m.results["ema"]["fid"]["value"])
    key_rows = []
    for name in wanted:
        m = best if name == "best" else next(m for m in measured if m.row.name == name)
        if m not in key_rows:
            evaluate(m, f"ema@{args.key_eval_n}", args.key_eval_n, True, args, runs)
            key_rows.append(m)
    return key_rows


if __name__ == "__main__":
    main()
