"""The GPU check: one command that runs what only a GPU can show, and writes it down as JSON and a markdown table.

    python scripts/gpu_check.py                     # on one H100 or H200: about 5 minutes
    python scripts/gpu_check.py --smoke --out DIR   # CPU, tiny sizes: the plumbing only (tests/test_gpu_check.py)

Three parts, each recorded even when another fails:

1. The CUDA-only tests (they skip on a CPU): pytest over the files that hold them, counted from its JUnit XML.
2. Graph vs eager, one variant per process (a failed capture leaves a process in capture state, so none is
   shared): the same seed trains STEPS steps eagerly, then with `trainer.cuda_graphs=true`; recorded: that the
   step was captured and replayed, whether the latents' random stream ended in the same state, and the largest
   weight difference, checked against TOLERANCE (fp32; bf16 variants against BF16_TOLERANCE).
3. The bench rows of docs/PERFORMANCE.md (scripts/bench.py, one process per batch size): the reference loop,
   the defaults, graphs, graphs + bf16 at batch 128, 512 and 2048 on dcgan64's networks, and the 28-px
   networks at batch 64.

Writes OUT/gpu_check.json and OUT/gpu_check.md (OUT defaults to docs/), with device, torch and date. In
--smoke mode the same code runs on the CPU at tiny sizes, graphs left out (CUDA graphs need CUDA): eager is
compared with eager, and the bench rows are two CPU rows; nothing it writes is a GPU figure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Dict, List

from dcgan.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
CUDA_TESTS = [
    "tests/test_cuda_only.py",
    "tests/test_speed_path.py::test_device_batches_equal_host_batches_without_a_sync",
    "tests/test_speed_path.py::test_the_captured_loop_does_not_sync_between_log_rows",
    "tests/test_reliability.py::test_the_guard_does_not_sync_the_gpu_per_step",
]
STEPS = 12  # per run of a variant: 3 eager warm-up steps, the capture, 8 replays
TOLERANCE = 1e-3  # largest |weight difference| after STEPS steps, fp32 (kernels may differ between graph and eager)
BF16_TOLERANCE = 5e-2  # bf16 rounds to 8 bits of mantissa; the autocast cache is off under a graph
VARIANTS = {
    "defaults (fp32)": ["trainer.amp=off"],
    "bf16": ["trainer.amp=bf16"],
    "hinge + spectral norm": ["trainer.amp=off", "loss=hinge", "discriminator.spectral_norm=true"],
    "wgan-gp": ["trainer.amp=off", "loss=wgan_gp", "discriminator.norm=none"],
    "R1 every step, d_steps=2": ["trainer.amp=off", "loss.r1_weight=1.0", "trainer.d_steps=2"],
    "DiffAugment, ema_start=4": ["trainer.amp=off", "augment.policy=[color,translation,cutout]", "trainer.ema_start=4"],
    "no EMA": ["trainer.amp=off", "trainer.ema=0"],
    "keras_mnist networks (dropout)": ["trainer.amp=off", "preset=keras_mnist"],
    # The labels are the captured step's static buffers beside the images.
    "conditional (embed G, projection D)": ["trainer.amp=off", "conditional=true"],
    "conditional (batchnorm G, label-plane D)": [
        "trainer.amp=off",
        "conditional=true",
        "generator.condition=batchnorm",
        "discriminator.condition=embed",
    ],
}
# (label, image size, batch, overrides of each `ours` row); the reference loop runs beside each batch.
BENCH = [
    (64, 128, ["", "trainer.cuda_graphs=true trainer.amp=off", "trainer.cuda_graphs=true trainer.amp=bf16"]),
    (64, 512, ["", "trainer.cuda_graphs=true trainer.amp=off", "trainer.cuda_graphs=true trainer.amp=bf16"]),
    (64, 2048, ["", "trainer.cuda_graphs=true trainer.amp=off", "trainer.cuda_graphs=true trainer.amp=bf16"]),
    (28, 64, ["", "trainer.cuda_graphs=true trainer.amp=off"]),
]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="folder for gpu_check.json and .md")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, no graphs: checks the script only")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # a child process: one graph-vs-eager comparison
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def compare_variant(name: str, device_name: str, smoke: bool) -> Dict[str, Any]:
    """In this process: train STEPS steps eagerly, then captured, from one seed; compare the two."""
    import torch

    from dcgan import train
    from dcgan.config import compose

    tiny = ["generator.width=0.125", "discriminator.width=0.125", "trainer.batch_size=64"] if smoke else []
    overrides = [*VARIANTS[name], "dataset=mnist_tiny", f"trainer.device={device_name}", *tiny]
    steps = 3 if smoke else STEPS
    device = torch.device(device_name)
    graphs = device.type == "cuda" and not smoke
    runs = {}
    for mode, use_graphs in (("eager", False), ("graph", graphs)):
        state, step, _ = train.build(compose("train", overrides), device, graphs=use_graphs)
        for _ in range(steps):
            step()
        captured = getattr(step, "graph", None) is not None
        runs[mode] = (state.state_dict(), state.noise.get_state(), captured)
    (eager, eager_noise, _), (graph, graph_noise, captured) = runs["eager"], runs["graph"]
    difference = max(
        (eager[part][key].double() - graph[part][key].double().to(eager[part][key].device)).abs().max().item()
        for part in ("generator", "discriminator")
        for key in eager[part]
        if eager[part][key].is_floating_point()
    )
    tolerance = BF16_TOLERANCE if "trainer.amp=bf16" in VARIANTS[name] else TOLERANCE
    result = {
        "variant": name,
        "captured": captured,
        "noise_stream_equal": bool(torch.equal(eager_noise, graph_noise)),
        "max_weight_difference": difference,
        "tolerance": tolerance,
    }
    result["ok"] = (captured or not graphs) and result["noise_stream_equal"] and difference <= tolerance
    return result


def run_variants(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Each variant in a child process of this script; a crash is recorded with its last stderr line."""
    names = list(VARIANTS)[:1] if args.smoke else list(VARIANTS)
    results = []
    for name in names:
        command = [sys.executable, __file__, "--variant", name, "--device", args.device]
        child = subprocess.run(command + (["--smoke"] if args.smoke else []), capture_output=True, text=True)
        lines = child.stdout.strip().splitlines()
        if child.returncode == 0 and lines:
            results.append(json.loads(lines[-1]))
        else:
            reason = (child.stderr.strip().splitlines() or ["no output"])[-1]
            results.append({"variant": name, "ok": False, "error": f"exit {child.returncode}: {reason[:300]}"})
    return results


def run_cuda_tests(out: Path) -> Dict[str, Any]:
    """pytest over the CUDA-only tests (they skip without CUDA); counts from its JUnit XML."""
    report = out / "gpu_check_tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *CUDA_TESTS]
    if _has_xdist():
        command += ["-n", "0"]
    child = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    report.unlink()
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"command": " ".join(command[1:]), "exit_code": child.returncode, **counts}


def _has_xdist() -> bool:
    try:
        import xdist  # noqa: F401
    except ImportError:
        return False
    return True


def run_bench(args: argparse.Namespace, out: Path) -> List[Dict[str, Any]]:
    """scripts/bench.py for each (size, batch) of BENCH; smoke: one tiny CPU bench."""
    if args.smoke:
        plan, data = [(16, 64, ["trainer.amp=bf16"])], ["--data", "synthetic", "--max-images", "64"]
        timing = ["--steps", "2", "--warmup", "1", "--threads", "1", "--no-reference"]
    else:
        plan, timing = BENCH, ["--steps", "100", "--warmup", "20"]
        source = ["fashion_mnist", "--root", str(FASHION_MNIST)] if FASHION_MNIST.is_dir() else ["mnist_tiny"]
        data = ["--data", *source]
    rows = []
    for size, batch, ours in plan:
        target = out / "gpu_check_bench.json"
        command = [sys.executable, str(REPO / "scripts" / "bench.py"), "--device", args.device, *data, *timing]
        command += ["--image-size", str(size), "--batch-size", str(batch), "--json", str(target)]
        command += [part for overrides in ours for part in ("--ours", overrides)]
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode != 0:
            reason = (child.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"image_size": size, "batch_size": batch, "error": reason[:300]})
            continue
        report = json.loads(target.read_text())
        target.unlink()
        for result in report["results"]:
            rows.append({"image_size": size, "batch_size": batch, "command": " ".join(command[1:]), **result})
    return rows


def write_markdown(report: Dict[str, Any], path: Path) -> None:
    t = report["tests"]
    lines = [
        f"# GPU check: {report['device']}, torch {report['torch']}, {report['date']}",
        "",
        f"Command: `{report['command']}`"
        + (" (smoke mode: CPU plumbing only, no GPU figures)" if report["smoke"] else ""),
        "",
        f"CUDA-only tests: {t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped",
        "",
        "| variant | captured | latent stream equal | max weight difference | tolerance | ok |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    for v in report["variants"]:
        if "error" in v:
            lines.append(f"| {v['variant']} | {v['error']} | | | | no |")
            continue
        lines.append(
            f"| {v['variant']} | {v['captured']} | {v['noise_stream_equal']} | {v['max_weight_difference']:.2e} | "
            f"{v['tolerance']:g} | {'yes' if v['ok'] else 'no'} |"
        )
    lines += ["", "| image size | batch | loop | images/s | x reference |", "| ---: | ---: | --- | ---: | ---: |"]
    for r in report["bench"]:
        if "error" in r:
            lines.append(f"| {r['image_size']} | {r['batch_size']} | error: {r['error']} | | |")
            continue
        ratio = f"{r['ratio_to_reference']:.2f}" if r.get("ratio_to_reference") is not None else "-"
        lines.append(f"| {r['image_size']} | {r['batch_size']} | {r['name']} | {r['images_per_s']:,.0f} | {ratio} |")
    atomic_write_text(path, "\n".join(lines) + "\n")


def main(argv: List[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.device = "cpu"
    if args.variant:
        print(json.dumps(compare_variant(args.variant, args.device, args.smoke)))
        return 0
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    report = {
        "command": " ".join(["python", "scripts/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": device,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "smoke": args.smoke,
        "tests": run_cuda_tests(args.out),
        "variants": run_variants(args),
        "bench": run_bench(args, args.out),
    }
    atomic_write_text(args.out / "gpu_check.json", json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out / "gpu_check.md")
    failed = report["tests"]["exit_code"] not in (0, 5) or not all(v["ok"] for v in report["variants"])
    print((args.out / "gpu_check.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
