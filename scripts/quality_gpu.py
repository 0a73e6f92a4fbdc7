"""`python scripts/quality.py --gpu`: the training recipes side by side on one GPU, FID against minutes and images seen.

What it does, in order:
1. Checks everything it can before any training (recipes, overrides, Inception weights, the reference data,
   the device) and stops with one line and exit code 2 when something is missing.
2. Starts one `python -m dcgan` (= gan-train) per recipe, all at once on the one device, each in its own run
   folder under --work, for --minutes of training wall-clock each (`trainer.max_minutes`), with a checkpoint
   every gcd(--eval-at) minutes (`trainer.ckpt_every_minutes`, all kept: `trainer.keep_last=0`).
3. After training (so evaluation never slows a run it measures), picks for each --eval-at time the
   checkpoint whose metrics.jsonl row is the first with `minutes` >= that time, and evaluates its EMA
   generator in this one process with gan-eval's own code (`dcgan.evaluate.run` on gan-eval's config):
   --eval-n generated images against the test split (10,000 images of Fashion-MNIST; `mnist_tiny` has no
   split: its images), the --inception-weights. The reference features are computed once and cached
   (torch-fidelity's cache under --work); each stamp is written beside its checkpoint (step_N.eval.json), as
   gan-eval writes it, and every number in the report is read from a stamp. The last point of each recipe is
   evaluated first; an evaluation that would end past --deadline-minutes (from the start of the study) is
   skipped and listed as such, so the study ends in time with the most useful points measured.
4. Writes docs/RESULTS_gpu.md (RESULTS_gpu_64px.md for --size 64) and docs/results/gpu_fid_<size>.png, atomically:
   device, torch, command, date, budget, one table per recipe (minutes, step, images seen, FID, D accuracy,
   G loss, the stamp), how each run ended (failed and diverged runs are listed, never dropped), the best recipe.
   With --device cpu it is a smoke run, says so, and writes under --work unless --docs is given.

    python scripts/quality.py --gpu                         # 28 px, default recipes, 5 min each, FID at 1,2,3,5 min
    python scripts/quality.py --gpu --size 64               # preset=dcgan64 (CelebA's recipe), Fashion-MNIST at 64 px
    python scripts/quality.py --gpu --make-fp16-weights W16 # a half-precision copy of the weights (48 MB), to stage

Cost with the defaults on one H200 (an estimate, NOT yet measured on a GPU): ~0.5 min of start-up, 5 min of
training (six runs sharing the GPU), then 24 evaluations of 10,000 images in --eval-workers threads: each is
a few seconds of Inception on the GPU plus ~3-5 s of CPU linear algebra (FID's 2048x2048 eigenvalues);
~1.5-2 min in all. About 7-8 minutes; --deadline-minutes 9 stops evaluating before 9. KID (--kid) adds
~3 s of CPU per evaluation. The stamps' `seconds` and the report's wall times say what it really took.

Inception weights: fp32 (the shared file, 96 MB), or an fp16 copy (48 MB, --make-fp16-weights): torch's
load_state_dict casts it back to fp32 when torch-fidelity loads it, so only the weights' rounding differs.
With fp16 weights and the fp32 file also present (--fp32-weights, default the shared file), the best
recipe's last checkpoint is evaluated with both and the FID shift is stated; otherwise the report says it is
unmeasured. Measured once on the CPU (2026-12-04; `gan-eval input1=` 500 Fashion-MNIST test images as PNGs,
`dataset=fashion_mnist n=500 reference_n=500`): FID 37.456 with the fp32 weights, 37.469 with the fp16 copy
(+0.013, 0.04%).

The GPU machine (torch, no hydra, no internet, 64 MiB carried per call, released after 30 s idle). Its own
start-up and each call count against the session's device time, so the study runs in one call after one
staging call:

    # 1. here, once: the pure-Python dependencies, the data and an fp16 copy of the weights, all git-ignored
    python -m pip install --no-deps --target .gpu-deps hydra-core omegaconf antlr4-python3-runtime==4.9.3 \
        torch-fidelity                                                        # ~5 MB
    mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*-images-idx3-ubyte.gz data/fashion-mnist/
    python scripts/quality.py --gpu --make-fp16-weights data/weights/inception-fp16.pth    # 48 MB (46 MiB)
    # 2. run tool, call 1: carry ["data/weights"], timeout_s 60, command: ls -l data/weights
    # 3. call 2, within 30 s of the first: carry ["data/fashion-mnist", ".gpu-deps"] (~35 MiB), timeout_s 600:
    PYTHONPATH=$PWD/src:$PWD/.gpu-deps timeout 570 python scripts/quality.py --gpu \
        --data-root data/fashion-mnist --inception-weights data/weights/inception-fp16.pth \
        --work /tmp/gpu-study --docs $OUT/docs; \
        cd /tmp/gpu-study && find . -name '*.json' -o -name '*.jsonl' -o -name '*.log' | tar czf $OUT/stamps.tgz -T -
    # 4. here: copy files_at/docs/RESULTS_gpu.md and files_at/docs/results/gpu_fid_28.png into docs/, commit them
    #    (stamps.tgz holds every stamp, metrics.jsonl and log the page was read from).

The same with `--size 64` writes RESULTS_gpu_64px.md and gpu_fid_64.png. The study stops within seconds
when the data or the weights are missing (one line, exit 2) or a module is (a traceback); carried files stay
while the machine is warm, so call 2 can be repeated. Besides torch it imports numpy, Pillow, PyYAML, tqdm
and torchvision; matplotlib is optional (without it the page says there is no plot).
The exact fp32 weights instead: split the file in two 48 MB pieces (`split -b 48M`), carry one per call
(three calls, each within 30 s of the last), and `cat` them together on the GPU before the study.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
WEIGHTS_FILE = "inception-2015-12-05-fidelity.pth"
DEFAULT_WEIGHTS = REPO.parent / "shared" / "models" / WEIGHTS_FILE
DEFAULT_RECIPES = "baseline,ttur,hinge_sn,lr_decay,big_batch,diffaug"
REPORTS = {28: "RESULTS_gpu.md", 64: "RESULTS_gpu_64px.md"}
EXIT_MEANING = {0: "finished", 2: "usage error", 3: "diverged", 130: "interrupted", 143: "stopped (SIGTERM)"}
NEVER = 10**9  # steps: trainer.max_steps, ckpt_every and sample_every that never come; the clock ends the run
START_UP_MARGIN_MIN = 3.0  # a training process still running this long after its --minutes is killed


class StudyError(Exception):
    """A problem with the study's inputs: one line on stderr and exit code 2, before anything trains."""


@dataclass
class Run:
    recipe: str
    run_dir: Path
    command: List[str]
    exit_code: Optional[int] = None
    wall_s: float = 0.0

    @property
    def status(self) -> str:
        if self.exit_code is None:
            return "not run"
        if self.exit_code < 0:
            return f"killed by signal {-self.exit_code}"
        meaning = EXIT_MEANING.get(self.exit_code, "failed")
        return meaning if self.exit_code == 0 else f"{meaning} (exit {self.exit_code})"

    @property
    def log(self) -> Path:
        return self.run_dir.parent / f"{self.recipe}.log"


@dataclass
class Point:
    """One recipe at one evaluation time: the checkpoint chosen for it and, once evaluated, its stamps."""

    recipe: str
    at_minutes: float  # the --eval-at time asked for
    row: Optional[Dict[str, Any]]  # the metrics.jsonl row of the chosen checkpoint; None: never reached
    images_per_step: int  # trainer.batch_size x trainer.d_steps of the run
    ckpt: Optional[Path] = None
    results: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # metric -> gan-eval's stamped result
    note: str = ""  # why there is no score

    @property
    def images(self) -> int:
        return self.row["step"] * self.images_per_step if self.row else 0

    @property
    def fid(self) -> Optional[float]:
        return self.results["fid"]["value"] if "fid" in self.results else None


# ---------------------------------------------------------------- pure parts: times, checkpoints, tables


def parse_times(text: str) -> List[float]:
    """'1,2,4' -> [1.0, 2.0, 4.0] (minutes, sorted, each > 0)."""
    try:
        times = sorted({float(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise StudyError(f"--eval-at takes minutes separated by commas, e.g. 1,2,3,5; got {text!r}") from None
    if not times or times[0] <= 0:
        raise StudyError(f"--eval-at needs one or more times above 0 minutes; got {text!r}")
    return times


def checkpoint_interval(times: Sequence[float]) -> float:
    """The largest interval (minutes) of which every time is a multiple: a checkpoint falls on each time."""
    fractions = [Fraction(t).limit_denominator(600) for t in times]  # to the second at least
    numerator, denominator = 0, 1
    for f in fractions:
        numerator, denominator = (
            math.gcd(numerator * f.denominator, f.numerator * denominator),
            denominator * f.denominator,
        )
    return float(Fraction(numerator, denominator))


def pick_rows(rows: List[Dict[str, Any]], ckpt_steps: set, times: Sequence[float]) -> Dict[float, Optional[Dict]]:
    """For each time, the first metrics row with a checkpoint at its step and `minutes` >= the time (None: never)."""
    saved = [r for r in rows if r["step"] in ckpt_steps and "minutes" in r]
    return {t: next((r for r in saved if r["minutes"] >= t - 1e-6), None) for t in times}


def best_point(points: List[Point]) -> Optional[Point]:
    """The lowest FID at the latest time at which any recipe was evaluated."""
    scored = [p for p in points if p.fid is not None]
    if not scored:
        return None
    last = max(p.at_minutes for p in scored)
    return min((p for p in scored if p.at_minutes == last), key=lambda p: p.fid)


def recipe_table(points: List[Point], work: Path) -> List[str]:
    """One recipe's rows: minutes, step, images seen, FID (KID), D accuracy and G loss there, and the stamp."""
    lines = [
        "| at | minutes trained | step | images seen | FID | KID x 10^3 | D accuracy | G loss | stamp |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        if p.row is None:
            lines.append(f"| {p.at_minutes:g} min | | | | {p.note} | | | | |")
            continue
        kid = p.results.get("kid")
        kid_cell = f"{1000 * kid['value']:.2f} ± {1000 * kid['std']:.2f}" if kid else "-"
        fid_cell, stamp = (
            (f"{p.fid:.2f}", f"`{relative(p.ckpt.with_suffix('.eval.json'), work)}`") if p.results else (p.note, "")
        )
        lines.append(
            f"| {p.at_minutes:g} min | {p.row['minutes']:.2f} | {p.row['step']:,} | {p.images:,} | {fid_cell} | "
            f"{kid_cell} | {number(p.row, 'd_accuracy')} | {number(p.row, 'loss_g')} | {stamp} |"
        )
    return lines


def number(row: Dict[str, Any], key: str) -> str:
    return f"{row[key]:.3f}" if key in row else "-"


def summary_table(runs: List[Run], points: Dict[str, List[Point]], times: Sequence[float]) -> List[str]:
    """Every recipe on one line: how its run ended, its last step and images seen, its FID at each time."""
    lines = [
        "| recipe | run | last step | images seen | " + " | ".join(f"FID @ {t:g} min" for t in times) + " |",
        "|---|---|---|---|" + "---|" * len(times),
    ]
    for run in runs:
        reached = [p for p in points.get(run.recipe, []) if p.row is not None]
        last = reached[-1] if reached else None
        cells = [f"{p.fid:.2f}" if p.fid is not None else "-" for p in points.get(run.recipe, [])]
        lines.append(
            f"| `{run.recipe}` | {run.status} | {last.row['step'] if last else '-'} | "
            f"{f'{last.images:,}' if last else '-'} | " + " | ".join(cells or ["-"] * len(times)) + " |"
        )
    return lines


def relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- training


def data_overrides(args) -> List[str]:
    """The data every recipe trains on; 64 px is preset=dcgan64 (gan-train dataset=celeba's recipe) on this data."""
    data = [f"dataset={args.dataset}"] + ([f"dataset.root={args.data_root}"] if args.dataset != "mnist_tiny" else [])
    size = [f"dataset.image_size={args.size}"]
    return (["preset=dcgan64"] if args.size == 64 else []) + data + size


def train_overrides(args, recipe: str, run_dir: Path) -> List[str]:
    every = checkpoint_interval(args.times)
    trainer = [
        f"trainer.device={args.device}",
        f"trainer.max_steps={NEVER}",
        f"trainer.max_minutes={args.minutes}",
        f"trainer.ckpt_every_minutes={every}",
        f"trainer.ckpt_every={NEVER}",
        f"trainer.sample_every={NEVER}",
        "trainer.keep_last=0",
        "trainer.progress=false",
    ]
    own = [o.split(":", 1)[1] for o in args.recipe_extra if o.split(":", 1)[0] == recipe]
    return [*data_overrides(args), f"recipe={recipe}", *trainer, *args.extra, *own, f"hydra.run.dir={run_dir}"]


def train_all(runs: List[Run], minutes: float) -> None:
    """Every recipe's gan-train at once, each for its own --minutes; a process that hangs past them is stopped."""
    started = time.monotonic()
    processes = []
    for run in runs:
        run.run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(run.log, "w") as log:
            log.write(f"$ {shlex.join(run.command)}\n")
            log.flush()
            processes.append(subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
    say(f"training {len(runs)} recipes at once for {minutes:g} min each: {', '.join(r.recipe for r in runs)}")
    deadline = started + 60 * (minutes + START_UP_MARGIN_MIN)
    for run, process in zip(runs, processes, strict=True):
        try:
            run.exit_code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.terminate()  # gan-train checkpoints and exits 143; its points so far still count
            run.exit_code = process.wait()
        run.wall_s = time.monotonic() - started
        say(f"  {run.recipe}: {run.status} after {run.wall_s / 60:.1f} min")


def read_rows(path: Path) -> List[Dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def points_of(run: Run, times: Sequence[float]) -> List[Point]:
    """The checkpoint chosen for each time (from the run's metrics rows and the checkpoints it kept)."""
    from omegaconf import OmegaConf

    from dcgan import checkpoint
    from dcgan.layout import RunFolder

    folder = RunFolder(run.run_dir)
    config = folder.root / ".hydra" / "config.yaml"
    trainer = OmegaConf.load(config).trainer if config.is_file() else None
    per_step = trainer.batch_size * trainer.d_steps if trainer else 0
    ckpts = {checkpoint.step_of(p): p for p in checkpoint.step_checkpoints(folder.checkpoints)}
    chosen = pick_rows(read_rows(folder.metrics), set(ckpts), times)
    points = []
    for t, row in chosen.items():
        point = Point(run.recipe, t, row, per_step, ckpts[row["step"]] if row else None)
        point.note = "" if row else f"not reached: {run.status}"
        points.append(point)
    return points


# ---------------------------------------------------------------- evaluation (gan-eval's own code, in this process)


def eval_overrides(args, ckpt: Path, weights: str, out: Path) -> List[str]:
    """gan-eval's command line for one checkpoint: n generated vs the test split at the run's image size."""
    data = [f"dataset={args.dataset}", f"dataset.image_size={args.size}", "dataset.split=test"]
    root = [f"dataset.root={args.data_root}"] if args.dataset != "mnist_tiny" else []
    return [
        f"ckpt={ckpt}",
        f"n={args.eval_n}",
        f"reference_n={args.reference_n}",
        f"metrics=[{'fid,kid' if args.kid else 'fid'}]",
        f"inception_weights={weights}",
        f"device={args.device}",
        f"cache_dir={Path(args.work) / 'fidelity-cache'}",
        f"out={out}",
        *data,
        *root,
    ]


def evaluate_one(cfg) -> Dict[str, Dict[str, Any]]:
    from dcgan import evaluate

    results, _ = evaluate.run(cfg)
    return {r["metric"]: r for r in results}


def evaluate_points(points: List[Point], args, weights: str, study_started: float) -> None:
    """Each point's checkpoint with gan-eval's protocol: last points first, none that would end past the deadline.

    The first evaluation runs alone (it computes and caches the reference features, and registers the
    extractor); the others share the device in --eval-workers threads (configs are composed first: Hydra's
    global state is not thread-safe).
    """
    from dcgan.config import compose

    todo = sorted((p for p in points if p.ckpt is not None), key=lambda p: (-p.at_minutes, p.recipe))
    configs = [compose("eval", eval_overrides(args, p.ckpt, weights, p.ckpt.with_suffix(".eval.json"))) for p in todo]
    deadline = study_started + 60 * args.deadline_minutes
    longest = [0.0]  # the slowest evaluation so far (seconds): what the next one may take

    def run_one(point: Point, cfg) -> None:
        if time.monotonic() + 1.2 * longest[0] > deadline:
            point.note = f"not evaluated: past --deadline-minutes {args.deadline_minutes:g}"
            return
        started = time.monotonic()
        try:
            point.results = evaluate_one(cfg)
        except Exception as error:  # one bad checkpoint must not cost the other points and the report
            point.note = f"evaluation failed: {type(error).__name__}: {' '.join(str(error).split())[:200]}"
            say(f"  {point.recipe} @ {point.at_minutes:g} min: {point.note}")
            return
        longest[0] = max(longest[0], time.monotonic() - started)
        say(f"  {point.recipe} @ {point.at_minutes:g} min (step {point.row['step']}): FID {point.fid:.2f}")

    say(f"evaluating {len(todo)} checkpoints with {args.eval_n:,} images each")
    if todo:
        run_one(todo[0], configs[0])
    with ThreadPoolExecutor(max_workers=args.eval_workers) as pool:
        for future in [pool.submit(run_one, p, c) for p, c in zip(todo[1:], configs[1:], strict=True)]:
            future.result()


def weights_precision(path: str) -> str:
    """'fp16' when the file's floating tensors are half precision (a --make-fp16-weights copy), else 'fp32'."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return "fp16" if any(v.dtype == torch.float16 for v in state.values()) else "fp32"


def make_fp16_weights(source: str, out: Path) -> None:
    """A half-precision copy of torch-fidelity's Inception weights (48 MB): staged where 64 MiB is the limit."""
    import torch

    from dcgan import files
    from dcgan.metrics import file_sha256

    if not source or not Path(source).is_file():
        raise StudyError(f"no fp32 Inception weights at {source!r} to convert; pass --inception-weights PATH")
    state = torch.load(source, map_location="cpu", weights_only=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write(out, lambda file: torch.save(half, file))
    stat = out.stat()
    print(f"wrote {out}: {stat.st_size:,} bytes, sha256 {file_sha256(str(out), stat.st_size, stat.st_mtime_ns)}")


def fp16_shift(best: Optional[Point], args, weights: str, study_started: float) -> Optional[Point]:
    """With fp16 weights and the fp32 file here: the best point evaluated again with fp32 (stamp *.fp32.eval.json)."""
    from dcgan.config import compose

    fp32 = args.fp32_weights
    if best is None or not fp32 or not Path(fp32).is_file() or weights_precision(fp32) != "fp32":
        return None
    if time.monotonic() + 60 > study_started + 60 * args.deadline_minutes:
        return None
    again = Point(best.recipe, best.at_minutes, best.row, best.images_per_step, best.ckpt)
    out = best.ckpt.with_suffix(".fp32.eval.json")
    say(f"the fp16 weights' FID shift: {best.recipe} @ {best.at_minutes:g} min with the fp32 weights")
    again.results = evaluate_one(compose("eval", eval_overrides(args, best.ckpt, fp32, out)))
    return again


# ---------------------------------------------------------------- the report


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores)"


def weights_line(points: List[Point], precision: str, shift: Optional[Point], best: Optional[Point]) -> str:
    """Which Inception weights every stamp names, and for an fp16 copy the FID shift measured on this run."""
    stamp = next((p.results["fid"] for p in points if p.fid is not None), None)
    if stamp is None:
        return "- **Inception weights:** no checkpoint was evaluated."
    protocol = stamp["protocol"]
    line = (
        f"- **Inception weights:** `{Path(protocol['weights_file']).name}` (sha256 `{protocol['weights_sha256'][:16]}"
        f"...`), {precision}"
    )
    if precision == "fp32":
        return line + ": the exact weights."
    if shift is None or best is None:
        return line + ", cast to fp32 when loaded; the FID shift against the fp32 weights was not measured on this run."
    delta = best.fid - shift.fid
    return line + (
        f", cast to fp32 when loaded. FID shift measured on this run: `{best.recipe}` @ {best.at_minutes:g} min scores "
        f"{best.fid:.4f} with them and {shift.fid:.4f} with the fp32 weights (`{relative(shift.ckpt, REPO)}`, "
        f"stamp `*.fp32.eval.json`): {delta:+.4f}."
    )


def header_lines(args, runs: List[Run], points: List[Point], timing: Dict[str, float], extra: Dict) -> List[str]:
    import torch

    smoke = args.device == "cpu"
    stamp = next((p.results["fid"] for p in points if p.fid is not None), None)
    protocol = f"{stamp['protocol']['library']}, {stamp['protocol']['feature_extractor']}" if stamp else "-"
    reference = (
        f"{stamp['reference']['count']:,} images of {stamp['reference']['source']} / split "
        f"{stamp['reference']['split']} ({stamp['reference']['selection']}), {stamp['reference']['image_size']} px"
        if stamp
        else "none measured"
    )
    title = "# GPU study: FID against training time, one curve per recipe"
    lines = [title + (" (CPU smoke run)" if smoke else ""), ""]
    if smoke:
        lines += [
            "**CPU smoke run, not a result:** this page checks that the GPU study's machinery works end to end at a "
            "tiny budget; its numbers say nothing about the recipes.",
            "",
        ]
    lines += [
        f"Generated by `scripts/quality.py --gpu` on {extra['date']}: {timing['study'] / 60:.1f} min in all "
        f"({timing['train'] / 60:.1f} min of training, {timing['eval'] / 60:.1f} min of evaluation). Every FID below "
        "is read from the `gan-eval` JSON stamp written beside its checkpoint; nothing is extrapolated.",
        "",
        f"- **Command:** `{extra['command']}`",
        f"- **Device:** {device_name(args.device)}, torch {torch.__version__}; {len(runs)} runs shared it at once.",
        f"- **Data:** {args.dataset}{' (preset=dcgan64, the CelebA recipe)' if args.size == 64 else ''} at "
        f"{args.size}x{args.size}, training split.",
        f"- **Budget:** {args.minutes:g} min of training wall-clock per recipe (`trainer.max_minutes`, start-up not "
        f"counted), all {len(runs)} at once; checkpoints every {checkpoint_interval(args.times):g} min.",
        f"- **Evaluation:** the EMA generator of the first checkpoint at or after each of {args.eval_at} min; "
        f"{args.eval_n:,} generated images (latent seeds 0..n-1) against {reference}; gan-eval's protocol "
        f"({protocol}).",
        weights_line(points, extra["precision"], extra["shift"], extra["best"]),
        "- **Images seen:** step x trainer.batch_size x trainer.d_steps of each run.",
        "",
    ]
    return lines


def write_report(args, runs: List[Run], points: Dict[str, List[Point]], timing, extra, docs: Path) -> Path:
    from dcgan import files

    work = Path(args.work)
    every = [p for ps in points.values() for p in ps]
    lines = header_lines(args, runs, every, timing, extra)
    lines += ["## All recipes", "", *summary_table(runs, points, args.times), ""]
    best = extra["best"]
    lines.append(
        f"**Best recipe:** `{best.recipe}`, FID {best.fid:.2f} at {best.at_minutes:g} min ({best.images:,} images)."
        if best
        else "**Best recipe:** none: no checkpoint was evaluated."
    )
    outright = [p.recipe for ps in points.values() if (p := last_scored(ps)) and p.row.get("d_accuracy", 0) >= 0.99]
    lines += [
        f"D winning outright (D accuracy >= 0.99 at the last evaluated point): {', '.join(outright) or 'none'}.",
        "",
        f"![FID against minutes and images seen]({extra['plot']})" if extra["plot"] else extra["plot_note"],
        "",
    ]
    for run in runs:
        lines += [f"## `{run.recipe}`: {run.status}", "", f"`{shlex.join(run.command)}`", ""]
        if run.exit_code != 0:
            lines += [f"Its log ends: `{last_log_line(run.log)}`", ""]
        lines += [*recipe_table(points.get(run.recipe, []), work), ""]
    out = docs / REPORTS[args.size]
    docs.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def last_scored(points: List[Point]) -> Optional[Point]:
    scored = [p for p in points if p.fid is not None]
    return scored[-1] if scored else None


def last_log_line(log: Path) -> str:
    lines = (
        [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    )
    return (lines[-1] if lines else "(empty)")[:300].replace("`", "'")


def plot(points: Dict[str, List[Point]], out: Path) -> str:
    """FID against minutes and against images seen, one curve per recipe; '' when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ""
    figure, (by_minutes, by_images) = plt.subplots(1, 2, figsize=(11, 4.2))
    for recipe, ps in points.items():
        scored = [p for p in ps if p.fid is not None]
        if scored:
            by_minutes.plot([p.row["minutes"] for p in scored], [p.fid for p in scored], "o-", label=recipe)
            by_images.plot([p.images for p in scored], [p.fid for p in scored], "o-", label=recipe)
    by_minutes.set(xlabel="minutes of training", ylabel="FID", title="FID against wall-clock")
    by_images.set(xlabel="images seen", ylabel="FID", title="FID against images seen")
    for axes in (by_minutes, by_images):
        axes.grid(alpha=0.3)
    by_images.legend(fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial.png")
    figure.savefig(partial, dpi=110)
    plt.close(figure)
    os.replace(partial, out)  # atomically, as the report
    return f"results/{out.name}"


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="quality.py --gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--size", type=int, choices=[28, 64], default=28, help="28: the defaults; 64: preset=dcgan64 (default 28)")
    add(
        "--recipes", default=DEFAULT_RECIPES, help=f"configs/recipe/ names, trained at once (default {DEFAULT_RECIPES})"
    )
    add("--minutes", type=float, default=5.0, help="training wall-clock per recipe, all at once (default 5)")
    add("--eval-at", default="1,2,3,5", help="minutes at which checkpoints are evaluated (default 1,2,3,5)")
    add("--eval-n", type=int, default=10000, help="generated images per evaluation (default 10000)")
    add("--reference-n", type=int, default=10000, help="test-split images in the reference (default 10000: all)")
    add("--kid", action="store_true", help="also KID (~3 s more CPU per evaluation)")
    add("--eval-workers", type=int, default=0, help="evaluations sharing the device at once (default 4; 1 on cpu)")
    add("--deadline-minutes", type=float, default=9.0, help="no evaluation ends past this, from the start (default 9)")
    add("--dataset", default="fashion_mnist", help="fashion_mnist (default), mnist, or mnist_tiny for a smoke test")
    add("--data-root", default="/usr/share/datasets/fashion-mnist", help="folder with the data set's IDX files")
    add("--inception-weights", default=os.environ.get("DCGAN_INCEPTION_WEIGHTS", str(DEFAULT_WEIGHTS)))
    add("--fp32-weights", default=str(DEFAULT_WEIGHTS), help="with fp16 weights: measure their FID shift with these")
    add("--make-fp16-weights", metavar="OUT", help="write a half-precision copy of --inception-weights and exit")
    add("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke run")
    add("--extra", nargs="+", default=[], help="gan-train overrides for every recipe")
    add("--recipe-extra", action="append", default=[], metavar="RECIPE:OVERRIDE", help="an override for one recipe")
    add("--work", default="", help="run folders (default outputs/quality-gpu/DATE_TIME)")
    add("--docs", default="", help="report folder (default docs/; on --device cpu, WORK/docs)")
    args = parser.parse_args(list(argv))
    args.work = args.work or str(REPO / "outputs" / "quality-gpu" / f"{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}")
    args.docs = args.docs or str(REPO / "docs" if args.device != "cpu" else Path(args.work) / "docs")
    args.recipe_list = [r.strip() for r in args.recipes.split(",") if r.strip()]
    args.eval_workers = args.eval_workers or (1 if args.device == "cpu" else 4)
    return args


def check_inputs(args) -> None:
    """Everything the study can check before it trains; a StudyError names the first problem."""
    import torch

    from dcgan import config, data, evaluate  # noqa: F401  (evaluate registers gan-eval's schema)
    from dcgan.errors import UserError

    args.times = parse_times(args.eval_at)
    if args.times[-1] > args.minutes or args.minutes >= args.deadline_minutes:
        raise StudyError(
            f"--eval-at ({args.eval_at}) must lie within --minutes ({args.minutes:g}), "
            f"and --minutes below --deadline-minutes ({args.deadline_minutes:g})"
        )
    if not args.inception_weights or not Path(args.inception_weights).is_file():
        raise StudyError(
            f"no Inception weights at {args.inception_weights!r}: pass --inception-weights PATH (the fp32 file or a "
            "--make-fp16-weights copy) or set DCGAN_INCEPTION_WEIGHTS; the study never downloads"
        )
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise StudyError(f"--device {args.device}: no CUDA device here; --device cpu runs a smoke test")
    missing = [r for r in args.recipe_list if not (config.config_dir() / "recipe" / f"{r}.yaml").is_file()]
    for item in args.recipe_extra:
        if ":" not in item or item.split(":", 1)[0] not in args.recipe_list:
            raise StudyError(f"--recipe-extra {item!r}: write RECIPE:OVERRIDE with RECIPE one of --recipes")
    if missing or not args.recipe_list:
        raise StudyError(f"no recipe {', '.join(missing) or '(none given)'} in {config.config_dir() / 'recipe'}")
    if Path(args.work).exists() and any(Path(args.work).iterdir()):
        raise StudyError(f"--work {args.work} holds an earlier study; pass a new folder")
    try:
        for recipe in args.recipe_list:  # the composed config, checked as gan-train checks it
            config.validate_train(config.compose("train", train_overrides(args, recipe, Path(args.work) / recipe)))
        reference = config.compose("eval", eval_overrides(args, Path("x.pt"), args.inception_weights, Path("x.json")))
        data.load_images(reference.dataset)  # the reference is there (the training split: gan-train checks it)
    except UserError as error:
        raise StudyError(str(error)) from None


def say(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def study(args, command: str, started: float) -> Path:
    """Train every recipe at once, evaluate their checkpoints, write the report; returns the report's path.

    `started`: time.monotonic() when the study began (its checks included): --deadline-minutes counts from there.
    """
    work, docs = Path(args.work), Path(args.docs)
    precision = weights_precision(args.inception_weights)
    say(f"inception weights: {args.inception_weights} ({precision})")
    runs = []
    for recipe in args.recipe_list:
        overrides = train_overrides(args, recipe, work / recipe)
        runs.append(Run(recipe, work / recipe, [sys.executable, "-m", "dcgan", *overrides]))
    train_all(runs, args.minutes)
    trained = time.monotonic()
    points = {run.recipe: points_of(run, args.times) for run in runs}
    evaluate_points([p for ps in points.values() for p in ps], args, args.inception_weights, started)
    best = best_point([p for ps in points.values() for p in ps])
    shift = fp16_shift(best, args, args.inception_weights, started) if precision == "fp16" else None
    timing = {"train": trained - started, "eval": time.monotonic() - trained}
    shown = plot(points, docs / "results" / f"gpu_fid_{args.size}.png")
    timing["study"] = time.monotonic() - started
    extra = {
        "command": command,
        "date": f"{datetime.datetime.now():%Y-%m-%d}",
        "precision": precision,
        "shift": shift,
        "best": best,
        "plot": shown,
        "plot_note": "(No plot: matplotlib is not installed here.)",
    }
    return write_report(args, runs, points, timing, extra, docs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """quality.py forwards its arguments here when they hold --gpu (removed before this sees them)."""
    import logging

    started = time.monotonic()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="gan-eval: %(message)s")
    try:
        if args.make_fp16_weights:
            make_fp16_weights(args.inception_weights, Path(args.make_fp16_weights))
            return 0
        check_inputs(args)
        out = study(args, "python scripts/quality.py --gpu " + shlex.join(argv), started)
    except StudyError as error:
        print(f"quality.py --gpu: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
