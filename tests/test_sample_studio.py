"""gan-sample's studio: truncation, per-seed images, interpolation grids, nearest neighbours, export and
sharing a generator as safetensors."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageSequence

from dcgan import cli, data, models, portable
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


# ---------------------------------------------------------------- sharing a generator: safetensors + JSON


@pytest.fixture(scope="module")
def exported(trained: Path, tmp_path_factory) -> Path:
    """The trained generator exported as safetensors, its JSON beside it."""
    folder = tmp_path_factory.mktemp("exported")
    run_cli("gan-sample", [f"ckpt={trained}", "mode=export", "format=safetensors", "out=G.safetensors"], cwd=folder)
    return folder / "G.safetensors"


def read_export(path: Path):
    """(tensors, the JSON in the header), read with the safetensors library alone."""
    safetensors = pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    with safetensors.safe_open(str(path), framework="pt") as file:
        about = json.loads(file.metadata()["dcgan"])
    return load_file(str(path)), about


def test_a_safetensors_export_samples_as_its_checkpoint_does(trained: Path, exported: Path, tmp_path: Path):
    for name, ckpt in (("checkpoint", trained), ("export", exported)):
        run_cli("gan-sample", [f"ckpt={ckpt}", "n=16", "seed=7", "device=cpu", f"out={name}.png"], cwd=tmp_path)
        run_cli("gan-sample", [f"ckpt={ckpt}", "mode=neighbors", "seeds=0-1", f"out={name}_nn.png"], cwd=tmp_path)
    assert (tmp_path / "checkpoint.png").read_bytes() == (tmp_path / "export.png").read_bytes()
    # The JSON names the training data, so neighbors searches the same images.
    assert (tmp_path / "checkpoint_nn.png").read_bytes() == (tmp_path / "export_nn.png").read_bytes()
    assert (tmp_path / "checkpoint_nn.json").read_text() == (tmp_path / "export_nn.json").read_text()
    # Exporting again from the export: the same file, and TorchScript works too.
    run_cli(
        "gan-sample", [f"ckpt={exported}", "mode=export", "format=safetensors", "out=again.safetensors"], cwd=tmp_path
    )
    assert (tmp_path / "again.safetensors").read_bytes() == exported.read_bytes()
    run_cli("gan-sample", [f"ckpt={exported}", "mode=export", "out=g.pt"], cwd=tmp_path)
    assert (tmp_path / "g.pt").is_file()


def test_a_safetensors_export_rebuilds_from_its_json_alone(trained: Path, exported: Path, generator):
    tensors, about = read_export(exported)
    assert about == json.loads(exported.with_suffix(".json").read_text())  # the sidecar says the same
    assert about["format"] == "dcgan-generator" and about["format_version"] == 1
    assert about["ema"] is True and about["step"] == 10 and about["output"]["range"] == [-1, 1]
    assert about["dataset"]["image_size"] == SIDE and about["dataset"]["channels"] == 1
    # Exactly the weights gan-sample uses: the EMA generator's, with its own BatchNorm statistics.
    ema = torch.load(trained, weights_only=True)["generator_ema"]
    assert tensors.keys() == ema.keys() and all(torch.equal(tensors[k], ema[k]) for k in ema)
    rebuilt = models.build_generator(OmegaConf.create({"generator": about["generator"], "dataset": about["dataset"]}))
    rebuilt.load_state_dict(tensors)  # strict: every key, every shape
    G, _ = generator
    z = latents(list(range(8)), about["generator"]["z_dim"], about["generator"]["z_distribution"])
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(z), G(z))


def rewritten(exported: Path, path: Path, change: Callable[[dict, dict], None]) -> Path:
    """A copy of the export with its tensors or JSON changed by `change(tensors, about)`."""
    from safetensors.torch import save_file

    tensors, about = read_export(exported)
    change(tensors, about)
    save_file(tensors, str(path), metadata={"dcgan": json.dumps(about)})
    return path


BAD_EXPORTS = {
    "newer": (
        lambda t, a: a.update(format_version=portable.FORMAT_VERSION + 1),
        [],
        "written by a newer version of dcgan",
    ),
    "missing tensor": (lambda t, a: t.pop(sorted(t)[0]), [], "does not match the generator its config describes"),
    "wrong shapes": (lambda t, a: a["generator"].update(width=0.5), [], "does not match the generator"),
    "no z_dim": (lambda t, a: a["generator"].pop("z_dim"), [], "lacks generator.z_dim"),
    "ema=false": (lambda t, a: None, ["ema=false"], "holds only the EMA generator's weights"),
    "no data set": (lambda t, a: a["dataset"].pop("name"), ["mode=neighbors"], "does not name the data set"),
}


@pytest.mark.parametrize("case", BAD_EXPORTS)
def test_bad_safetensors_files_are_one_line_errors(exported: Path, tmp_path: Path, case: str, capsys):
    change, args, message = BAD_EXPORTS[case]
    path = rewritten(exported, tmp_path / "bad.safetensors", change)
    with pytest.raises(SystemExit) as exit:
        cli.sample_main([f"ckpt={path}", "device=cpu", f"out={tmp_path / 'out.png'}", *args])
    error = capsys.readouterr().err
    assert exit.value.code == 2 and message in error and len(error.strip().splitlines()) == 1, error
    assert not (tmp_path / "out.png").exists()


def test_truncated_and_foreign_safetensors_files_exit_2_without_a_traceback(exported: Path, tmp_path: Path):
    from safetensors.torch import save_file

    content = exported.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(content[: len(content) // 2])
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))  # another tool's: no dcgan metadata
    for name, message in (("truncated", "it may be truncated or damaged"), ("foreign", "not a dcgan generator export")):
        result = run_cli("gan-sample", [f"ckpt={name}.safetensors", "device=cpu"], cwd=tmp_path, check=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "grid.png").exists()


def test_safetensors_without_its_package_says_what_to_install(trained, exported, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors now raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    out = tmp_path / "G.safetensors"
    for args in (
        [f"ckpt={trained}", "mode=export", "format=safetensors", f"out={out}"],
        [f"ckpt={exported}", f"out={out.with_suffix('.png')}"],
    ):
        with pytest.raises(SystemExit) as exit:
            cli.sample_main([*args, "device=cpu"])
        error = capsys.readouterr().err
        assert exit.value.code == 2 and "needs the safetensors package: pip install 'dcgan[export]'" in error
    assert not list(tmp_path.iterdir())
