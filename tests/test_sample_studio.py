"""gan-sample's studio: truncation, per-seed images, interpolation grids, nearest neighbours and export."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from dcgan import cli, data
from dcgan.images import generate, latents, to_uint8
from dcgan.sample import load_generator, nearest_neighbors

from conftest import FAST, run_cli

SIDE = 28  # mnist_tiny images; grids put 2 black pixels around each


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("studio")
    run_cli("gan-train", [*FAST, "trainer.max_steps=10", f"hydra.run.dir={root / 'run'}"], cwd=root)
    return root / "run" / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def generator(trained: Path):
    G, cfg, _ = load_generator(trained, torch.device("cpu"))
    return G, cfg


def expected(generator, seeds: List[int], truncation: Optional[float] = None) -> np.ndarray:
    """The images of `seeds` made here, in one batch of their own: uint8 [n, S, S]."""
    G, cfg = generator
    z = latents(seeds, cfg.generator.z_dim, cfg.generator.z_distribution, truncation=truncation)
    return to_uint8(generate(G, z))[:, 0].numpy()


def tiles(path: Path, rows: int, columns: int) -> np.ndarray:
    """A grid image cut back into its images: [rows, columns, S, S]."""
    grid = np.asarray(Image.open(path).convert("L"))
    assert grid.shape == (rows * (SIDE + 2) + 2, columns * (SIDE + 2) + 2)
    return np.stack(
        [
            np.stack(
                [
                    grid[2 + r * (SIDE + 2) : 2 + r * (SIDE + 2) + SIDE, 2 + c * (SIDE + 2) : 2 + c * (SIDE + 2) + SIDE]
                    for c in range(columns)
                ]
            )
            for r in range(rows)
        ]
    )


def close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to one 8-bit level: float rounding may differ between batch sizes, a wrong latent does not."""
    return int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1


def test_truncation_redraws_only_entries_beyond_the_threshold():
    plain = latents(list(range(32)), 100, "normal")
    truncated = latents(list(range(32)), 100, "normal", truncation=0.7)
    inside = plain.abs() <= 0.7
    assert truncated.abs().max() <= 0.7
    assert torch.equal(truncated[inside], plain[inside])
    assert (truncated[~inside] != plain[~inside]).all()
    # A seed alone gets the same latent as in a batch; without truncation, exactly a fresh CPU generator's draw.
    assert torch.equal(latents([3], 100, "normal", truncation=0.7)[0], truncated[3])
    assert torch.equal(plain[3], torch.randn(100, generator=torch.Generator().manual_seed(3)))
    # Redrawn, not clamped: the entries follow N(0, 1) cut to [-1, 1], whose variance is 1 - 2 phi(1) / (2 Phi(1) - 1).
    cut_to_one = latents(list(range(2000)), 100, "normal", truncation=1.0)
    density, mass = math.exp(-0.5) / math.sqrt(2 * math.pi), math.erf(1 / math.sqrt(2))
    assert cut_to_one.var().item() == pytest.approx(1 - 2 * density / mass, abs=0.005)
    uniform = latents(list(range(8)), 50, "uniform")
    assert torch.equal(latents(list(range(8)), 50, "uniform", truncation=0.5), uniform * 0.5)


def test_per_seed_images_with_truncation(trained: Path, generator, tmp_path: Path):
    run_cli(
        "gan-sample",
        [f"ckpt={trained}", "mode=seeds", "seeds=0-63", "truncation=0.7", "out=faces", "device=cpu"],
        cwd=tmp_path,
    )
    assert sorted(p.name for p in (tmp_path / "faces").iterdir()) == [f"seed{s:04d}.png" for s in range(64)]
    alone = expected(generator, [5, 63], truncation=0.7)  # a batch of 2 here, of 64 in the command
    for seed, want in zip((5, 63), alone, strict=False):
        image = Image.open(tmp_path / "faces" / f"seed{seed:04d}.png")
        assert image.size == (SIDE, SIDE) and image.mode == "L"
        assert close(np.asarray(image), want), seed
    assert not close(np.asarray(Image.open(tmp_path / "faces" / "seed0005.png")), expected(generator, [5])[0])


def test_interpolation_as_gif_and_as_grid(trained: Path, generator, tmp_path: Path):
    keys = expected(generator, [0, 3, 5])
    # No out=: the movie gets its default name.
    run_cli("gan-sample", [f"ckpt={trained}", "mode=interpolate", "seeds=0,3,5", "frames=4", "fps=10"], cwd=tmp_path)
    gif = Image.open(tmp_path / "interpolation.gif")
    frames = [np.asarray(frame.convert("L")) for frame in ImageSequence.Iterator(gif)]
    assert len(frames) == 12 and gif.size == (SIDE, SIDE) and gif.info["duration"] == 100  # 3 legs of 4, closed
    assert close(frames[0], keys[0]) and close(frames[4], keys[1]) and close(frames[8], keys[2])

    run_cli(
        "gan-sample", [f"ckpt={trained}", "mode=interpolate", "seeds=0,3,5", "frames=4", "out=walk.png"], cwd=tmp_path
    )
    grid = tiles(tmp_path / "walk.png", rows=2, columns=5)  # open path: a row per leg, both ends shown
    assert close(grid[0, 0], keys[0]) and close(grid[0, 4], keys[1])
    assert close(grid[1, 0], keys[1]) and close(grid[1, 4], keys[2])
    assert not close(grid[0, 2], keys[0]) and not close(grid[0, 2], keys[1])


def test_nearest_neighbour_of_a_training_image_is_itself(generator):
    _, cfg = generator
    training = data.load_images(cfg.dataset)[:600]
    queries = training[[0, 17, 599]]
    # Chunks of 50 images, so the merge across chunks is exercised.
    distances, indices = nearest_neighbors(queries, training, k=4, chunk_bytes=50 * 8 * SIDE * SIDE)
    assert indices[:, 0].tolist() == [0, 17, 599]
    assert (distances[:, 0] == 0).all()
    brute_force = torch.cdist(queries.flatten(1).double(), training.flatten(1).double())
    want_distances, want_indices = brute_force.topk(4, largest=False)
    assert torch.equal(indices, want_indices)
    assert torch.allclose(distances, want_distances)


def test_neighbors_panel(trained: Path, generator, tmp_path: Path):
    _, cfg = generator
    run_cli("gan-sample", [f"ckpt={trained}", "mode=neighbors", "seeds=0-3", "k=3", "out=nn.png"], cwd=tmp_path)
    panel = tiles(tmp_path / "nn.png", rows=4, columns=4)
    summary = json.loads((tmp_path / "nn.json").read_text())
    training = data.load_images(cfg.dataset)
    assert summary["training_images"] == len(training)
    samples = expected(generator, [0, 1, 2, 3])
    for row, entry in enumerate(summary["samples"]):
        assert entry["seed"] == row and close(panel[row, 0], samples[row])
        for column, index in enumerate(entry["nearest"], start=1):
            assert np.array_equal(panel[row, column], training[index, 0].numpy())
        # The first listed is the closest of all 5000 training images to the sample shown.
        to_all = (training.flatten(1).double() - torch.from_numpy(panel[row, 0]).flatten().double()).norm(dim=1)
        assert entry["l2"][0] == pytest.approx(to_all.min().item(), abs=1e-3)
        assert entry["l2"] == sorted(entry["l2"])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, yet it is the format asked for
def test_exported_generators_match_the_original(trained: Path, generator, tmp_path: Path):
    G, cfg = generator
    z = latents(list(range(100, 105)), cfg.generator.z_dim, cfg.generator.z_distribution)  # a batch size not traced
    with torch.no_grad():
        want = G(z)

    run_cli("gan-sample", [f"ckpt={trained}", "mode=export", "out=g.pt"], cwd=tmp_path)
    about = {"dcgan.json": ""}
    scripted = torch.jit.load(str(tmp_path / "g.pt"), _extra_files=about)
    assert torch.allclose(scripted(z), want, atol=1e-6)
    assert json.loads(about["dcgan.json"])["z_dim"] == cfg.generator.z_dim

    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    run_cli("gan-sample", [f"ckpt={trained}", "mode=export", "format=onnx"], cwd=tmp_path)
    model = onnx.load(str(tmp_path / "generator.onnx"))
    onnx.checker.check_model(model)
    assert {p.key: p.value for p in model.metadata_props}["z_distribution"] == cfg.generator.z_distribution
    session = onnxruntime.InferenceSession(str(tmp_path / "generator.onnx"))
    for batch in (z, z[:1]):
        (images,) = session.run(["images"], {"z": batch.numpy()})
        assert np.allclose(images, want[: len(batch)].numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["mode=studio"], "not a sampling mode"),
        (["mode=export", "format=tflite"], "not an export format"),
        (["truncation=-1"], "truncation must be > 0"),
        (["mode=neighbors", "k=0"], "k must be >= 1"),
    ],
)
def test_bad_requests_are_one_line_errors(trained: Path, args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.sample_main([f"ckpt={trained}", *args])
    error = capsys.readouterr().err
    assert exit.value.code == 2 and message in error and len(error.strip().splitlines()) == 1


def test_onnx_export_without_its_packages_says_what_to_install(trained: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    out = tmp_path / "g.onnx"
    with pytest.raises(SystemExit) as exit:
        cli.sample_main([f"ckpt={trained}", "mode=export", "format=onnx", f"out={out}", "device=cpu"])
    assert exit.value.code == 2 and "pip install 'dcgan[export]'" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())
