"""gan-eval on a class-conditional checkpoint: intra-class FID, each class's generated images against that class's
reference images only, with the mean and the worst class; and the per-class settings refused where they mean nothing.

Inception on a CPU costs a 2048x2048 eigenvalue problem per FID (10-20 s on two cores), so the checks of which
images each class's FID uses run gan-eval with a stand-in feature extractor (4-d pixel statistics, through the
same scores); one test runs the installed gan-eval with the real Inception on one class.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from dcgan import cli, data, metrics
from dcgan.config import compose
from dcgan.images import generate, latents, to_uint8
from dcgan.intraclass import measured_labels
from dcgan.labels import FASHION_MNIST_CLASSES
from dcgan.metrics import ImageSet, frechet_distance, seeded_subset
from dcgan.sample import load_generator
from dcgan.train import train

from conftest import FAST, WEIGHTS, assert_eval_refused, needs_weights, run_cli

N, REFERENCE_N, CLASSES = 40, 300, 10  # 4 generated images per class; about 30 reference images per class


@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("conditional-run")
    train(compose("train", [*FAST, "conditional=true", "dataset=mnist_tiny", "trainer.max_steps=2"]), run_dir)
    return run_dir / "checkpoints" / "last.pt"


def quadrant_means(images) -> torch.Tensor:
    """Stand-in features [N, 4]: the mean pixel of each quadrant, a real function of each image."""
    stacked = torch.stack([images[i].float() for i in range(len(images))]).mean(dim=1)  # [N, H, W]
    return torch.nn.functional.adaptive_avg_pool2d(stacked, 2).flatten(1)


def stand_in_features(generated, reference, *args, **kwargs):
    return quadrant_means(generated.images), quadrant_means(reference.images)


def test_each_class_is_measured_against_its_own_reference_images_only(
    conditional_checkpoint: Path, tmp_path: Path, monkeypatch, capsys
):
    monkeypatch.setattr(metrics, "fidelity_features", stand_in_features)
    out = tmp_path / "eval.json"
    cli.eval_main(
        [f"ckpt={conditional_checkpoint}", f"n={N}", f"reference_n={REFERENCE_N}", "metrics=[fid]", "device=cpu",
         f"out={out}"]
    )  # fmt: skip
    table = capsys.readouterr().out
    overall, intra = json.loads(out.read_text())["results"]
    assert overall["metric"] == "fid" and intra["metric"] == "intra_class_fid"
    assert overall["generated"]["classes"] == "10 classes drawn equally: image i has class i mod 10"
    per_class = intra["per_class"]
    assert [c["label"] for c in per_class] == list(range(CLASSES)) and [c["class"] for c in per_class] == list(
        "0123456789"
    )
    values = [c["value"] for c in per_class]
    assert intra["value"] == intra["mean"] == pytest.approx(sum(values) / CLASSES)
    worst = max(per_class, key=lambda c: c["value"])
    assert intra["worst"] == {"label": worst["label"], "class": worst["class"], "value": worst["value"]}
    assert f"worst: class {worst['class']} (label {worst['label']}) {worst['value']:.3f}" in table

    # Each class again, by hand: its generated images drawn with its label, against the reference subset's images
    # of that class, as the data's labels say.
    G, train_cfg, _ = load_generator(conditional_checkpoint, torch.device("cpu"))
    dataset = compose("train", ["dataset=mnist_tiny"]).dataset
    picked = seeded_subset(len(data.load_images(dataset)), REFERENCE_N, seed=0)
    reference, labels = data.load_images(dataset)[picked], data.load_labels(dataset).indices[picked]
    for c in per_class:
        seeds = list(range(c["label"], N, CLASSES))
        z = latents(seeds, train_cfg.generator.z_dim, train_cfg.generator.z_distribution, "cpu")
        images = to_uint8(generate(G, z, torch.full((len(seeds),), c["label"])))
        own = reference[labels == c["label"]]
        assert c["generated"] == len(seeds) == N // CLASSES and c["reference"] == len(own)
        expected = frechet_distance(quadrant_means(ImageSet(images)), quadrant_means(ImageSet(own)))
        assert c["value"] == pytest.approx(expected, rel=1e-5), c
        against_all = frechet_distance(quadrant_means(ImageSet(images)), quadrant_means(ImageSet(reference)))
        assert c["value"] != pytest.approx(against_all, rel=1e-3)  # the other classes' images are not in it


def test_reference_n_per_class_takes_that_many_of_each_class(conditional_checkpoint: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(metrics, "fidelity_features", stand_in_features)
    out = tmp_path / "eval.json"
    cli.eval_main(
        [f"ckpt={conditional_checkpoint}", "n=60", "n_per_class=5", f"reference_n={REFERENCE_N}",
         "reference_n_per_class=12", "classes=[7,2]", "metrics=[fid]", "device=cpu", f"out={out}"]
    )  # fmt: skip
    intra = json.loads(out.read_text())["results"][1]
    assert [(c["label"], c["generated"], c["reference"]) for c in intra["per_class"]] == [(2, 5, 12), (7, 5, 12)]
    assert intra["reference"]["per_class"] == 12 and intra["generated"]["per_class"] == 5


def test_per_class_settings_are_refused_where_they_mean_nothing(conditional_checkpoint: Path, tmp_path: Path, capsys):
    plain_dir = tmp_path / "plain"
    train(compose("train", [*FAST, "trainer.max_steps=1"]), plain_dir)
    plain = plain_dir / "checkpoints" / "last.pt"
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(2):
        Image.new("L", (28, 28), 100 * i).save(folder / f"{i}.png")
    conditional = [f"ckpt={conditional_checkpoint}", f"n={N}", f"reference_n={REFERENCE_N}", "device=cpu"]
    cases = {
        "unconditional": ([f"ckpt={plain}", "n=8", "per_class=true"], "per_class=true would have no effect: the "
                          "checkpoint is not class-conditional"),
        "folder input": ([f"input1={folder}", "dataset=mnist_tiny", "n_per_class=5"], "n_per_class=5 would have no "
                         "effect: a folder's images have no class"),
        "off": ([*conditional, "per_class=false", "classes=[3]"], "classes=[3] would have no effect: per_class=false"),
        "mode": ([*conditional, "per_class=sometimes"], "per_class must be one of auto, true, false"),
        "too few references": ([*conditional, "reference_n_per_class=200"], "class 0 has 25 reference images, fewer "
                               "than the 200 its intra-class FID needs"),
        "too few generated": ([*conditional, "n_per_class=8"], "n_per_class=8 needs 80 generated images (10 "
                              "classes), more than n=40"),
        "no such class": ([*conditional, "classes=[3,cat]"], "classes: no class 'cat'; classes: 0, 1, 2"),
        "negative index": ([*conditional, "classes=[-1]"], "classes: no class -1: the 10 classes are numbered 0..9"),
        "unlabelled reference": ([*conditional, f"input2={folder}", "per_class=true"], "per_class=true cannot "
                                 "measure intra-class FID: the reference is a folder"),
    }  # fmt: skip
    for args, message in cases.values():
        assert_eval_refused(args, message, capsys)


def test_classes_are_named_as_gan_sample_names_them():
    """classes=[...] takes what class= takes: a loose spelling of a name, or an index, on any class names."""
    assert measured_labels(["ankle_boot", "7", "Sneaker", "t-shirt"], FASHION_MNIST_CLASSES) == [0, 7, 9]


@needs_weights
def test_gan_eval_measures_intra_class_fid_with_inception(conditional_checkpoint: Path, tmp_path: Path):
    """The installed command, the real extractor, one class (each class's FID is a 2048x2048 eigenproblem)."""
    args = [f"ckpt={conditional_checkpoint}", "n=20", "reference_n=60", "classes=[3]", "metrics=[kid]",
            "kid_subsets=2", "kid_subset_size=4", f"inception_weights={WEIGHTS}", f"cache_dir={tmp_path / 'cache'}",
            "device=cpu", f"out={tmp_path / 'eval.json'}"]  # fmt: skip
    result = run_cli("gan-eval", args, cwd=tmp_path)
    kid, intra = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert kid["metric"] == "kid" and intra["metric"] == "intra_class_fid"
    (three,) = intra["per_class"]
    assert three["class"] == "3" and three["generated"] == 2 and three["reference"] >= 2
    assert three["value"] > 0 and intra["worst"]["value"] == intra["mean"] == three["value"]
    assert intra["protocol"]["weights_sha256"] == kid["protocol"]["weights_sha256"]
    assert "kid_subsets" not in intra["protocol"] and intra["reference"]["split"] == "all"
    assert "INTRA_CLASS_FID" in result.stdout and f"worst: class 3 (label 3) {three['value']:.3f}" in result.stdout
