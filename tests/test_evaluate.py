"""FID/KID through torch-fidelity: the metric's sanity, the reference cache, gan-eval end to end, and
evaluation during training.

Inception runs on real MNIST digits (the shipped subset) with the offline weights file: set
DCGAN_INCEPTION_WEIGHTS, or keep the team's copy at ../shared/models/ beside the repository. Without it
these tests skip (they never download). Sets are a few dozen images, so each FID costs mostly its
fixed 2048x2048 eigenvalue problem (about 10 s on two CPU cores).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from pathlib import Path

import pytest
import torch
import torch_fidelity
from PIL import Image

from dcgan import checkpoint, cli, evaluate, metrics
from dcgan.config import compose
from dcgan.metrics import ImageSet, ImageSource, MetricsConfig, measure, reference_from_dataset, resolve_weights
from dcgan.train import train

from conftest import FAST, WEIGHTS, assert_eval_refused, needs_weights, run_cli

COUNT = 24  # images per set: enough for a meaningful difference, few enough for a CPU


def settings(cache_dir: Path, metrics=("fid",)) -> MetricsConfig:
    return MetricsConfig(
        n=COUNT, reference_n=COUNT, metrics=list(metrics), inception_weights=str(WEIGHTS), cache_dir=str(cache_dir)
    )


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """FID of 24 real digits against themselves, then of the same digits shifted sideways, against one cached
    reference."""
    cache = tmp_path_factory.mktemp("fidelity-cache")
    dataset = compose("train", ["dataset=mnist_tiny"]).dataset
    first_reference = reference_from_dataset(dataset, COUNT, seed=0)
    digits = first_reference.images.images
    same = measure(
        ImageSource(ImageSet(digits.clone()), {"count": COUNT}), first_reference, settings(cache), torch.device("cpu")
    )
    second_reference = reference_from_dataset(dataset, COUNT, seed=0)  # a new object: nothing carried over in memory
    shifted_digits = torch.roll(digits, shifts=10, dims=3)  # the digit moves 10 of 28 pixels right, wrapping around
    shifted = measure(
        ImageSource(ImageSet(shifted_digits), {"count": COUNT}), second_reference, settings(cache), torch.device("cpu")
    )
    return {
        "same": same[0],
        "shifted": shifted[0],
        "first": first_reference,
        "second": second_reference,
        "cache": cache,
    }


@needs_weights
def test_fid_of_a_set_with_itself_is_zero_and_with_a_shifted_set_is_large(digits_runs):
    same, shifted = digits_runs["same"]["value"], digits_runs["shifted"]["value"]
    assert abs(same) < 0.5, same
    assert shifted > 50, shifted
    assert digits_runs["same"]["generated"]["count"] == digits_runs["same"]["reference"]["count"] == COUNT


@needs_weights
def test_reference_features_are_cached_and_reused(digits_runs):
    first, second = digits_runs["same"]["protocol"], digits_runs["shifted"]["protocol"]
    assert first["reference_features"] == "computed" and digits_runs["first"].images.reads >= COUNT
    # The second evaluation never touched a reference image: its features came from disk.
    assert second["reference_features"] == "cached" and digits_runs["second"].images.reads == 0
    assert first["cache"] == second["cache"]
    name = Path(first["cache"]).name
    # Keyed by data set, split, size, count and the weights' hash.
    for part in ("mnist_tiny", "all", "28px", f"n{COUNT}", resolve_weights(str(WEIGHTS)).cache_key):
        assert part in name, (part, name)
    assert list(digits_runs["cache"].glob(f"{name}-*features-2048.pt"))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tiny-run")
    train(compose("train", [*FAST, "trainer.max_steps=4"]), run_dir)
    return run_dir / "checkpoints" / "last.pt"


@needs_weights
def test_gan_eval_end_to_end_writes_a_complete_protocol_stamp(tiny_checkpoint: Path, tmp_path: Path):
    args = [
        f"ckpt={tiny_checkpoint}",
        f"n={COUNT}",
        f"reference_n={COUNT}",
        f"inception_weights={WEIGHTS}",
        f"cache_dir={tmp_path / 'cache'}",
        "device=cpu",
    ]
    result = run_cli("gan-eval", args, cwd=tmp_path)
    # What it really used, then a bar with an ETA over each side's features, ending at its count.
    log = result.stderr.replace("\r", "\n").splitlines()
    assert f"gan-eval: reference: {COUNT} images of mnist_tiny (28x28x1) from the bundled MNIST subset" in log
    assert f"gan-eval: generated: {COUNT} images of checkpoint {tiny_checkpoint}" in log
    for side in ("generated", "reference"):
        assert any(line.startswith(f"Inception features, {side}: 100%") and f"{COUNT}/{COUNT}" in line for line in log)
    table = result.stdout.splitlines()
    assert table[0].split()[:2] == ["metric", "value"] and table[1].startswith("FID") and table[2].startswith("KID")
    written = tiny_checkpoint.with_suffix(".eval.json")
    assert f"wrote {written}" in result.stdout
    results = json.loads(written.read_text())["results"]
    assert [r["metric"] for r in results] == ["fid", "kid"]
    fid, kid = results
    assert fid["value"] > 0 and kid["std"] is None  # n = reference_n = kid_subset_size: one subset, no spread
    assert table[2].split()[1:6] == [f"{kid['value']:.5f}", "(one", "subset:", "no", "spread)"]
    # The stamp: metric, both counts, the reference split, image sizes, the weights' hash, the library version.
    assert fid["generated"]["count"] == fid["reference"]["count"] == COUNT
    assert fid["generated"]["weights"] == "ema" and fid["generated"]["step"] == 4
    assert fid["reference"]["split"] == "all" and fid["reference"]["source"] == "data set mnist_tiny"
    assert fid["generated"]["image_size"] == fid["reference"]["image_size"] == 28
    assert fid["protocol"]["weights_sha256"] == hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    assert fid["protocol"]["library"] == f"torch-fidelity {torch_fidelity.__version__}"
    assert kid["protocol"]["kid_subset_size"] == COUNT  # capped at the image count
    for r in results:
        for section in ("generated", "reference", "protocol"):
            assert all(value not in (None, "") for key, value in r[section].items() if key != "cache"), (
                section,
                r[section],
            )

    # The same images written by gan-sample and read back as a folder give the same KID: PNG is lossless,
    # and the folder path feeds the extractor exactly what the checkpoint path does.
    folder = tmp_path / "samples"
    cli.sample_main([f"ckpt={tiny_checkpoint}", "mode=seeds", f"n={COUNT}", f"out={folder}", "device=cpu"])
    result = run_cli("gan-eval", [f"input1={folder}", "dataset=mnist_tiny", *args[2:], "metrics=[kid]"], cwd=tmp_path)
    folder_kid = json.loads((tmp_path / "samples.eval.json").read_text())["results"][0]
    assert folder_kid["protocol"]["reference_features"] == "cached"  # the checkpoint's evaluation cached them
    assert "Inception features, generated" in result.stderr and "Inception features, reference" not in result.stderr
    assert folder_kid["value"] == pytest.approx(kid["value"], rel=1e-4, abs=1e-6)


def test_gan_eval_reports_user_errors_in_one_line(tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i, size in enumerate((28, 28, 32)):
        Image.new("L", (size, size), 40 * i).save(pictures / f"{i}.png")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a state dict")
    same_size = tmp_path / "same"
    same_size.mkdir()
    for i in range(2):
        Image.new("L", (28, 28), 100 * i).save(same_size / f"{i}.png")
    cases = {
        "sizes": ([f"input1={pictures}", f"input2={pictures}"], "different sizes"),
        "bad weights": (
            [f"input1={same_size}", f"input2={same_size}", f"inception_weights={junk}", f"cache_dir={tmp_path}"],
            "is not torch-fidelity Inception-v3 weights",
        ),
        "n=1": (["ckpt=x.pt", "n=1"], "n must be at least 2"),
        "no images": ([f"input1={empty}", "dataset=mnist_tiny"], "no images in"),
        "missing weights": (["ckpt=x.pt", f"inception_weights={tmp_path / 'nope.pth'}"], "is not a file"),
        "nothing": ([], "nothing to evaluate"),
        "both": (["ckpt=x.pt", f"input1={empty}"], "not both"),
    }
    for args, message in cases.values():
        assert_eval_refused(args, message, capsys)


@needs_weights
def test_training_logs_fid_and_keeps_the_best_checkpoint(tmp_path: Path):
    run_dir = tmp_path / "run"
    train(
        compose(
            "train",
            [
                *FAST,
                "trainer.max_steps=6",
                "trainer.eval_every=3",
                "eval.n=16",
                "eval.reference_n=16",
                f"eval.inception_weights={WEIGHTS}",
                f"eval.cache_dir={tmp_path / 'cache'}",
            ],
        ),
        run_dir,
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = {r["step"]: r for r in rows if "fid" in r}
    assert sorted(evaluated) == [3, 6]
    assert all(r["fid"] > 0 and "kid" in r and "loss_d" in r for r in evaluated.values())
    best_step = min(evaluated, key=lambda step: evaluated[step]["fid"])
    stamp = json.loads((run_dir / "checkpoints" / "best.eval.json").read_text())
    assert stamp["step"] == best_step and stamp["best_by"] == "fid"
    assert stamp["results"][0]["value"] == pytest.approx(evaluated[best_step]["fid"], abs=1e-5)
    best = checkpoint.load(run_dir / "checkpoints" / checkpoint.BEST)
    assert best["step"] == best_step
    # best.pt is a full training state, but never what resume=auto picks up.
    assert checkpoint.latest(run_dir / "checkpoints").name == checkpoint.LAST


def test_counts_name_what_was_asked_when_the_data_had_fewer():
    assert evaluate.counted(5000, "mnist_tiny", "n", 10000) == "5000 images of mnist_tiny (n=10000)"
    assert evaluate.counted(5000, "mnist_tiny", "reference_n", 0) == "5000 images of mnist_tiny"  # 0: all of them
    assert evaluate.counted(64, "checkpoint last.pt", "n", 64) == "64 images of checkpoint last.pt"


def test_kid_of_every_image_in_one_subset_claims_no_spread(tmp_path: Path, monkeypatch):
    """With as many images on each side as kid_subset_size, every subset is both sets whole: the std over subsets
    is 0 whatever the images, so it is not reported as a spread; with more images, it is."""

    def features(generated, reference, *args, **kwargs):  # stand-in features: no Inception needed
        return generated.images.images.float().flatten(1)[:, :64], reference.images.images.float().flatten(1)[:, :64]

    monkeypatch.setattr(metrics, "fidelity_features", features)
    generated = torch.randint(0, 255, (12, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reference = torch.randint(0, 255, (30, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    stamp = {"count": 12, "image_size": 8}
    kid_settings = MetricsConfig(metrics=["kid"], kid_subsets=10, kid_subset_size=12, cache_dir=str(tmp_path))
    whole = measure(ImageSource(ImageSet(generated), stamp), ImageSource(ImageSet(reference[:12]), stamp),
                    kid_settings, torch.device("cpu"))[0]  # fmt: skip
    assert whole["std"] is None and whole["protocol"]["kid_subsets"] == 1
    drawn = measure(ImageSource(ImageSet(generated), stamp), ImageSource(ImageSet(reference), stamp),
                    kid_settings, torch.device("cpu"))[0]  # fmt: skip
    assert drawn["std"] > 0 and drawn["protocol"]["kid_subsets"] == 10


def test_a_long_cpu_evaluation_says_how_long_from_the_first_batch(tmp_path: Path, monkeypatch, caplog, capsys):
    """The rate comes from timing the first batch: 8 images in 4 s here, so 2,992 more images take ~25 min."""
    images = torch.zeros(2000, 1, 8, 8, dtype=torch.uint8)
    generated = ImageSource(ImageSet(images[:1000]), {"count": 1000})
    reference = ImageSource(ImageSet(images), {"count": 2000}, cache_key="not-cached-yet")
    generated, reference = metrics.with_progress(generated, reference, 8, torch.device("cpu"), tmp_path, "absent")
    clock = iter([100.0, 104.0])  # the first read, then the first read of the second batch
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    on_stderr = logging.StreamHandler(sys.stderr)  # where gan-eval's lines go, beside the bar
    logging.getLogger("dcgan.metrics").addHandler(on_stderr)
    try:
        with caplog.at_level(logging.WARNING, logger="dcgan.metrics"):
            for index in range(9):
                generated.images[index]
    finally:
        logging.getLogger("dcgan.metrics").removeHandler(on_stderr)
    (warning,) = [record.getMessage() for record in caplog.records]
    assert warning.startswith("this takes about 25 min on the CPU: 3000 images through Inception at 2.0 images/s")
    assert "reference features included" in warning
    # The bar drawn at 0% is cleared first, so the warning starts its own line rather than trailing the bar.
    assert re.search(r"(^|[\r\n])this takes about", capsys.readouterr().err)
