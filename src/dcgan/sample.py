"""The sampling studio (`gan-sample`): everything a checkpoint alone can make.

  grid         one PNG of n images                   seeds        one PNG per seed (seeds=0-63)
  interpolate  a spherical walk through key seeds,   neighbors    each sample beside its k nearest training
               as a looping GIF or a grid (.png)                  images (pixel L2): is G copying its data?
  export       the generator as TorchScript or ONNX, for use without this package; or its weights as
               safetensors with a JSON that rebuilds it (portable.py), which ckpt= also takes back
  classes      a class-conditional checkpoint's classes, one row each, the same latents in every column
               (so a column keeps its style while the class changes)

A class-conditional checkpoint (gan-train conditional=true) draws the class `class=` names (its name or index)
in grid, seeds, interpolate and neighbors; without it seed s draws class s mod C (a walk: its first key seed's
class), so there too an image depends on its seed only; `class=[Sneaker,Bag]` with
mode=interpolate walks from class to class at the latent of `seed=`. Its exports take the labels as a second
input.

Image i of a grid with `seed=s` comes from seed s+i (images.latents), so an image depends on its seed
only. `truncation=t` trades variety for fidelity in every mode that draws images (see `images.latents`).
`scale=K` writes every image and movie K times larger, each pixel a KxK block (nearest neighbour: sharp, no
invented detail). A setting the chosen mode does not read (truncation on export, seeds= for a grid) is
refused, not ignored.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from torch import nn

from dcgan import checkpoint, config, data, files, models, portable
from dcgan.distributed import resolve_device, validate_device
from dcgan.errors import UserError, at_most, check_output_file, check_seeds, check_writable_folder, finite, unused
from dcgan.images import (
    MAX_GIF_FPS,
    enlarge,
    generate,
    latents,
    save_atomically,
    save_gif,
    save_grid,
    to_pil,
    to_uint8,
)
from dcgan.state import CLASSES, CONFIG_YAML, STEP, sampling_weights


@dataclass
class SampleConfig:
    ckpt: str = ""  # the checkpoint to sample from (required): a .pt checkpoint, or a .safetensors export
    mode: str = "grid"  # grid | seeds | interpolate | neighbors | export
    n: int = 64  # images in the grid
    nrow: int = 8  # images per grid row
    seed: int = 0  # first seed: image i of the grid comes from seed + i
    seeds: str = ""  # mode=seeds, neighbors: e.g. "0-15" or "3,7,42"; mode=interpolate: the key seeds to pass through
    frames: int = 16  # mode=interpolate: frames between two key seeds
    fps: int = 12  # mode=interpolate: GIF frame rate
    # File (grid, interpolate: .gif = movie, .png = grid with a row per leg; neighbors; export) or folder (seeds);
    # "" = grid.png, seeds/, interpolation.gif, neighbors.png, generator.pt (torchscript), generator.onnx or
    # generator.safetensors (with generator.json beside it).
    out: str = ""
    device: str = "auto"
    ema: bool = True  # use the EMA generator when the checkpoint has one
    truncation: Optional[float] = None  # truncation trick: normal latents redrawn beyond +-t; uniform scaled by t
    k: int = 5  # mode=neighbors: nearest training images shown beside each sample
    dataset_root: Optional[str] = None  # mode=neighbors: the training data, if not at the checkpoint's dataset.root
    format: str = "torchscript"  # mode=export: torchscript | onnx | safetensors
    scale: int = 1  # images and movies: each pixel becomes a scale x scale block (nearest neighbour), 1 to 16
    # `class=` on the command line (a Python keyword, so class_ here): a conditional checkpoint's class to draw,
    # by name or index; mode=interpolate also takes a list (class=[Sneaker,Bag]). None = every class in turn.
    class_: Any = None


CLASS_KEY = "class"  # what users type for SampleConfig.class_


def schema() -> DictConfig:
    """SampleConfig as Hydra composes it: the same typed settings, with class_ spelled `class`."""
    node = OmegaConf.structured(SampleConfig)
    with open_dict(node):
        node[CLASS_KEY] = None
        del node["class_"]
    return node


def request(composed: DictConfig) -> SampleConfig:
    """The composed gan-sample config as a SampleConfig."""
    settings = OmegaConf.to_container(composed, resolve=True)
    settings["class_"] = settings.pop(CLASS_KEY, None)
    return SampleConfig(**settings)


config.register_schema("sample_schema", schema())


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation: stays on the shell where Gaussian latents live, unlike a straight line."""
    cos = (a * b).sum() / (a.norm() * b.norm())
    omega = torch.arccos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    if omega.abs() < 1e-4:
        return torch.lerp(a, b, t)
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def walk(keys: torch.Tensor, frames: int, closed: bool, between=slerp) -> torch.Tensor:
    """Points along a path through the key vectors: [legs, points per leg, features]. `between(a, b, t)` draws
    each leg: slerp for latents (great circles, where Gaussian latents live), torch.lerp for class weights.

    A closed path (a looping movie) goes back to the first key, and each leg leaves its end to the
    next leg: `frames` points per leg. An open path (a grid, one row per leg) shows both ends.
    """
    pairs = [(i, i + 1) for i in range(len(keys) - 1)] + ([(len(keys) - 1, 0)] if closed else [])
    points = frames if closed else frames + 1
    return torch.stack(
        [torch.stack([between(keys[a], keys[b], step / frames) for step in range(points)]) for a, b in pairs]
    )


# The largest scale=: 28 px digits become 448 px, a 64 px face 1024 px.
MAX_SCALE = 16
# Images one command makes at most: a typo such as seeds=0-99999999999 fails at once, not after filling memory.
MAX_IMAGES = 1_000_000


def parse_seeds(text: str) -> List[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]; a range must run upwards, and every seed must be one torch takes."""
    ranges = []
    try:
        for part in str(text).replace(" ", "").split(","):
            if not part:
                continue
            if "-" in part[1:]:
                first, last = part.split("-", 1) if not part.startswith("-") else (part, part)
                ranges.append((part, int(first), int(last)))
            else:
                ranges.append((part, int(part), int(part)))
    except ValueError:
        raise UserError(f"seeds={text!r} is not a seed list; write it like 0-15 or 3,7,42") from None
    if not ranges:
        raise UserError(
            f"seeds={text!r} names no seeds; write them like 0-15 or 3,7,42 (or leave seeds unset to use seed= and n=)"
        )
    for part, first, last in ranges:
        if last < first:
            raise UserError(
                f"seeds={text}: the range {part} runs backwards; write the smaller seed first, e.g. {last}-{first}"
            )
        check_seeds("seeds", first, last)
    count = sum(last - first + 1 for _, first, last in ranges)
    if count > MAX_IMAGES:
        raise UserError(
            f"seeds={text} asks for {count:,} images; gan-sample makes at most {MAX_IMAGES:,} per command, "
            "so split the range"
        )
    return [seed for _, first, last in ranges for seed in range(first, last + 1)]


def load_generator(path: str | Path, device: torch.device, use_ema: bool = True):
    """Rebuild the generator from the config stored in a checkpoint; EMA weights when present.

    A .safetensors export is read as the checkpoint keys it stands for (portable.read), so what follows,
    the strict weight check included, is the same for both.
    """
    saved = portable.read(Path(path), use_ema) if portable.is_portable(path) else checkpoint.load(path)
    try:
        cfg = config.train_config_from_yaml(saved[CONFIG_YAML])
    except UserError as error:
        raise UserError(f"{path}: {error}") from None
    G = models.build_generator(cfg, "cpu", len(saved.get(CLASSES) or ()))
    weights, _ = sampling_weights(saved, use_ema)
    try:
        G.load_state_dict(weights)
    except RuntimeError as error:
        raise UserError(f"{path} does not match the generator its config describes: {str(error)[:200]}") from None
    return G.to(device).eval(), cfg, saved


# ---------------------------------------------------------------- the studio's modes


@dataclass
class Studio:
    """What every mode works with: the generator, the config it was trained with, the user's request."""

    G: nn.Module
    train_cfg: DictConfig
    cfg: SampleConfig
    device: torch.device
    weights: str = "generator"  # which generator of the checkpoint G is: "ema" or "generator" (sampling_weights)
    step: int = 0  # the training step G's weights come from
    classes: Tuple[str, ...] = ()  # a conditional G's class names, by label; () for an unconditional one
    wanted: Tuple[int, ...] = ()  # the classes class= asks for, as indices

    def latents(self, seeds: List[int], device: Optional[torch.device | str] = None) -> torch.Tensor:
        g = self.train_cfg.generator
        return latents(seeds, g.z_dim, g.z_distribution, self.device if device is None else device, self.cfg.truncation)

    def labels(self, seeds: List[int]) -> Optional[torch.Tensor]:
        """The class of each seed's image: class= for all of them; without it, seed s draws class s mod C (of a
        conditional G), so an image depends on its seed alone, not on which seeds are drawn with it."""
        if self.wanted:
            return torch.full((len(seeds),), self.wanted[0], device=self.device)
        if self.classes:
            return torch.tensor(seeds, device=self.device) % len(self.classes)
        return None

    def draw(self, seeds: List[int]) -> torch.Tensor:
        """Images in [-1, 1], one per seed, of the class asked for."""
        return generate(self.G, self.latents(seeds), self.labels(seeds))

    def seeds(self) -> List[int]:
        """`seeds=` when given, else n seeds from `seed=`."""
        cfg = self.cfg
        return parse_seeds(cfg.seeds) if cfg.seeds else list(range(cfg.seed, cfg.seed + cfg.n))

    def out(self) -> Path:
        return output_path(self.cfg)


def write_grid(studio: Studio) -> List[Path]:
    cfg, out = studio.cfg, studio.out()
    save_grid(studio.draw(list(range(cfg.seed, cfg.seed + cfg.n))), out, cfg.nrow, cfg.scale)
    return [out]


def write_classes(studio: Studio) -> List[Path]:
    """One row per class, `nrow` columns from seeds seed, seed + 1, ...: a column is one latent in every class."""
    cfg, out, count = studio.cfg, studio.out(), len(studio.classes)
    z = studio.latents(list(range(cfg.seed, cfg.seed + cfg.nrow))).repeat(count, 1)
    labels = torch.arange(count, device=studio.device).repeat_interleave(cfg.nrow)
    save_grid(generate(studio.G, z, labels), out, cfg.nrow, cfg.scale)
    names = out.with_suffix(".json")  # which row is which class
    files.atomic_write_text(
        names, json.dumps({"rows": list(studio.classes), "seeds": [cfg.seed, cfg.seed + cfg.nrow - 1]}) + "\n"
    )
    return [out, names]


def write_seeds(studio: Studio) -> List[Path]:
    seeds, folder = studio.seeds(), studio.out()
    images = to_uint8(studio.draw(seeds))
    paths = [folder / f"seed{seed:04d}.png" for seed in seeds]
    for image, path in zip(images, paths, strict=False):
        save_atomically(enlarge(to_pil(image), studio.cfg.scale), path)
    return paths


# The files a grid can be (Pillow writes each by its suffix); an interpolation written to one of these is a
# still grid (a row per leg), to MOVIE_SUFFIX a looping movie.
GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MOVIE_SUFFIX = ".gif"


def write_interpolation(studio: Studio) -> List[Path]:
    cfg, out = studio.cfg, studio.out()
    as_grid = out.suffix.lower() in GRID_SUFFIXES
    if len(studio.wanted) > 1:  # from class to class at one latent: the class weights move, z stays
        one_hot = torch.eye(len(studio.classes))[list(studio.wanted)]
        legs = walk(one_hot, cfg.frames, closed=not as_grid, between=torch.lerp)
        z = studio.latents([cfg.seed]).expand(legs.shape[0] * legs.shape[1], -1)
        images = to_uint8(generate(studio.G, z, legs.flatten(0, 1).to(studio.device)))
    else:
        # The path is computed on the CPU from CPU latents, so it is the same on every device.
        keys = interpolation_keys(cfg)
        legs = walk(studio.latents(keys, device="cpu"), cfg.frames, closed=not as_grid)
        z = legs.flatten(0, 1).to(studio.device)
        # One class for the whole walk (class=, else the first key seed's), so only the latent moves.
        images = to_uint8(generate(studio.G, z, studio.labels(keys[:1] * len(z))))
    if as_grid:
        save_grid(images, out, nrow=legs.shape[1], scale=cfg.scale)
        return [out]
    save_gif([enlarge(to_pil(image), cfg.scale) for image in images], out, round(1000 / cfg.fps))
    return [out]


def interpolation_keys(cfg: SampleConfig) -> List[int]:
    """The key seeds the walk passes through: seeds=, else seed and seed + 1."""
    keys = parse_seeds(cfg.seeds) if cfg.seeds else [cfg.seed, cfg.seed + 1]
    if cfg.frames < 1 or cfg.fps < 1:  # a walk through classes too: said without naming seeds it does not read
        raise UserError(f"interpolate needs frames >= 1 and fps >= 1, got frames={cfg.frames}, fps={cfg.fps}")
    if len(keys) < 2:
        raise UserError("interpolate needs at least two seeds (seeds=0,1,2), or two classes (class=[A,B])")
    check_walk("seeds", keys, keys)
    return keys


def check_walk(key: str, asked: Sequence[Any], keys: Sequence[int]) -> None:
    """A walk's legs each go somewhere: the same key twice in a row would be frames of one unchanging image."""
    repeated = next((i for i in range(1, len(keys)) if keys[i] == keys[i - 1]), None)
    if repeated is not None:
        listed = ",".join(str(a) for a in asked)
        given, what = (f"[{listed}]", "class") if key == CLASS_KEY else (listed, "seed")
        raise UserError(
            f"{key}={given}: {asked[repeated - 1]} then {asked[repeated]} is the same {what} twice in a row, a leg "
            "of the walk that goes nowhere; name different ones in turn"
        )


def write_neighbors(studio: Studio) -> List[Path]:
    """A panel with a row per sample: the sample, then its k nearest training images; and their distances as JSON."""
    cfg, out = studio.cfg, studio.out()
    seeds = studio.seeds()
    samples = to_uint8(studio.draw(seeds))
    training = training_images(studio.train_cfg, cfg.dataset_root)
    distances, indices = nearest_neighbors(samples, training, cfg.k, studio.device)
    neighbors = training[indices.flatten()].view(*indices.shape, *samples.shape[1:])
    panel = torch.cat([samples.unsqueeze(1), neighbors], dim=1)  # [n, 1 + k, C, S, S]
    save_grid(panel.flatten(0, 1), out, nrow=panel.shape[1], scale=cfg.scale)
    table = out.with_suffix(".json")
    rows = [
        {"seed": seed, "nearest": row_indices.tolist(), "l2": [round(d, 3) for d in row_distances.tolist()]}
        for seed, row_indices, row_distances in zip(seeds, indices, distances, strict=False)
    ]
    summary = {"distance": "L2 over 8-bit pixel values", "training_images": len(training), "samples": rows}
    files.atomic_write_text(table, json.dumps(summary, indent=1) + "\n")
    return [out, table]


def training_images(train_cfg: DictConfig, root: Optional[str]) -> torch.Tensor:
    """The checkpoint's training set, as the run saw it (same size, channels, max_images)."""
    if not train_cfg.dataset.name:  # a .safetensors export whose JSON names no data set (portable.rebuild_yaml)
        raise UserError(
            "the generator file does not name the data set it was trained on, so mode=neighbors has nothing to "
            "search; run it on the checkpoint the file was exported from"
        )
    dataset = train_cfg.dataset if root is None else OmegaConf.merge(train_cfg.dataset, {"root": root})
    try:
        return data.load_images(dataset)
    except UserError as error:
        raise UserError(f"{error} (for gan-sample: pass dataset_root=PATH)") from None


def nearest_neighbors(
    queries: torch.Tensor, images: torch.Tensor, k: int, device: torch.device | str = "cpu", chunk_bytes: int = 2**28
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k images nearest each query in pixel space: (L2 distances [n, k], indices [n, k]), nearest first.

    Both inputs are uint8 [*, C, S, S]; distances are in 8-bit pixel units. `images` is read in
    chunks of about `chunk_bytes`, so a memory-mapped CelebA never sits in memory as floats.
    """
    # float64 keeps squared distances between 8-bit images exact (integers far below 2**53), so an
    # image's distance to itself is exactly 0 and the ranking is the same on every device.
    q = queries.flatten(1).to(device, torch.float64)
    q_squared = q.square().sum(1, keepdim=True)
    rows_per_chunk = max(1, chunk_bytes // (8 * q.shape[1]))
    best_squared = q.new_empty(len(q), 0)
    best_index = torch.empty(len(q), 0, dtype=torch.long, device=device)
    for start in range(0, len(images), rows_per_chunk):
        chunk = images[start : start + rows_per_chunk].flatten(1).to(device, torch.float64)
        squared = q_squared - 2 * q @ chunk.T + chunk.square().sum(1)  # ||q - x||^2, one matrix product
        index = torch.arange(start, start + len(chunk), device=device).expand(len(q), -1)
        candidates = torch.cat([best_squared, squared], dim=1)
        best_squared, order = candidates.topk(min(k, candidates.shape[1]), dim=1, largest=False)
        best_index = torch.cat([best_index, index], dim=1).gather(1, order)
    return best_squared.clamp_min(0).sqrt().cpu(), best_index.cpu()


# The default file of each export format.
EXPORT_FORMATS = {"torchscript": "generator.pt", "onnx": "generator.onnx", "safetensors": "generator.safetensors"}
EXPORT_SUFFIXES = {"torchscript": (".pt", ".pth"), "onnx": (".onnx",), "safetensors": (portable.SUFFIX,)}


def write_export(studio: Studio) -> List[Path]:
    out = studio.out()
    if studio.cfg.format == "safetensors":
        # Weights and the recipe to rebuild G, not a traced program: nothing runs G here.
        description = portable.describe(studio.train_cfg, studio.weights, studio.step, studio.classes)
        return portable.save(studio.G, description, out)
    export_generator(studio.G, studio.train_cfg, studio.cfg.format, out, studio.classes)
    return [out]


def export_generator(
    G: nn.Module, train_cfg: DictConfig, export_format: str, path: Path, classes: Sequence[str] = ()
) -> None:
    """Save G (eval mode, on the CPU) as a file that runs without this package, for any batch size.

    Input: latents `z` [batch, z_dim], drawn as in training (train_cfg.generator.z_distribution), and for a
    conditional G `labels` [batch], int64 class indices into `classes`; output: `images` [batch, C, S, S] in
    [-1, 1]. These facts travel inside the file: a `dcgan.json` extra file in TorchScript, metadata properties
    in ONNX.
    """
    G = G.cpu().eval()
    g = train_cfg.generator
    z = latents([0, 1], g.z_dim, g.z_distribution)
    example = (z, torch.tensor([0, len(classes) - 1])) if classes else (z,)
    about = {
        "z_dim": g.z_dim,
        "z_distribution": g.z_distribution,
        "image_size": train_cfg.dataset.image_size,
        "channels": train_cfg.dataset.channels,
        "output": "images [batch, channels, image_size, image_size] in [-1, 1]",
        "config_yaml": checkpoint.config_yaml(train_cfg),
        **({"inputs": "z [batch, z_dim], labels [batch] int64", "classes": list(classes)} if classes else {}),
    }
    files.atomic_create(path, lambda temporary: EXPORTERS[export_format](G, example, about, temporary))


def export_torchscript(G: nn.Module, example: Tuple[torch.Tensor, ...], about: Dict[str, object], path: Path) -> None:
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, but TorchScript is what torch.jit.load and libtorch read.
        warnings.simplefilter("ignore", FutureWarning)
        # Saved to memory, then written: torch.jit.save to a path aborts the whole process on a full disk (its
        # writer fails in a C++ destructor), where a Python write raises an OSError we can report.
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.trace(G, example), buffer, _extra_files={"dcgan.json": json.dumps(about)})
    path.write_bytes(buffer.getvalue())


def export_onnx(G: nn.Module, example: Tuple[torch.Tensor, ...], about: Dict[str, object], path: Path) -> None:
    onnx = import_onnx()
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        G,
        example,
        str(path),
        dynamo=True,
        input_names=["z", "labels"][: len(example)],
        output_names=["images"],
        dynamic_shapes=tuple({0: batch} for _ in example),
        external_data=False,
        verbose=False,
    )
    model = onnx.load(str(path))
    # Properties are strings: a list (the class names) as JSON, which any language reads back, not Python's repr.
    onnx.helper.set_model_props(
        model, {key: value if isinstance(value, str) else json.dumps(value) for key, value in about.items()}
    )
    onnx.save(model, str(path))


def import_onnx():
    """The onnx module, or a UserError naming the packages torch's ONNX exporter needs."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx.export(dynamo=True) is built on it)
    except ImportError:
        raise UserError("format=onnx needs the onnx and onnxscript packages: pip install 'dcgan[export]'") from None
    return onnx


EXPORTERS = {"torchscript": export_torchscript, "onnx": export_onnx}

MODES: Dict[str, Callable[[Studio], List[Path]]] = {
    "grid": write_grid,
    "seeds": write_seeds,
    "interpolate": write_interpolation,
    "neighbors": write_neighbors,
    "export": write_export,
    "classes": write_classes,
}


def check_sample_config(cfg: SampleConfig) -> None:
    """The checks that need no checkpoint, so a typo fails before anything is loaded."""
    if cfg.mode not in MODES:
        raise UserError(f"mode={cfg.mode!r} is not a sampling mode; choose {', '.join(MODES)}")
    validate_device("device", cfg.device)
    if cfg.ckpt in ("???", "", None):
        raise UserError("no checkpoint given: pass ckpt=PATH (e.g. ckpt=outputs/RUN/checkpoints/last.pt)")
    if cfg.n < 1 or cfg.nrow < 1:
        raise UserError(f"n and nrow must be >= 1, got n={cfg.n} nrow={cfg.nrow}")
    if cfg.truncation is not None:
        finite("truncation", cfg.truncation)  # inf truncates nothing: leave truncation unset for that
    if cfg.truncation is not None and not cfg.truncation > 0:
        raise UserError(f"truncation must be > 0 (or null for none), got {cfg.truncation}")
    if cfg.k < 1:
        raise UserError(f"k must be >= 1, got {cfg.k}")
    if cfg.format not in EXPORT_FORMATS:
        raise UserError(f"format={cfg.format!r} is not an export format; choose one of {', '.join(EXPORT_FORMATS)}")
    if not 1 <= cfg.scale <= MAX_SCALE:
        raise UserError(f"scale must be a whole number from 1 to {MAX_SCALE} (pixels per pixel), got {cfg.scale}")
    if cfg.mode == "export" and cfg.scale != 1:
        raise UserError("scale enlarges images; mode=export writes the generator itself, so leave scale out")
    if cfg.n > MAX_IMAGES:
        raise UserError(
            f"n={cfg.n:,} is more images than gan-sample makes in one command ({MAX_IMAGES:,}); split the job by seed"
        )
    at_most("k", cfg.k, MAX_NEIGHBORS, f"the panel would hold {cfg.k + 1:,} images in each sample's row")
    at_most("fps", cfg.fps, MAX_GIF_FPS, "a GIF plays frames at most 50 a second (browsers slow faster ones to 10)")
    check_request_seeds(cfg)
    check_settings_used(cfg)
    check_class_request(cfg)
    count = images_requested(cfg)
    if count > MAX_IMAGES:
        raise UserError(
            f"mode={cfg.mode} would make {count:,} images, more than the {MAX_IMAGES:,} gan-sample makes in one "
            "command; ask for fewer (n, seeds, frames) or split the job by seed"
        )
    check_output(cfg)


MAX_NEIGHBORS = 100  # mode=neighbors: training images shown beside each sample

# The settings each mode reads (ckpt, mode, out, device and ema: all of them); another one changed is refused.
SETTINGS_READ = {
    "grid": ("n", "nrow", "seed", "truncation"),
    "seeds": ("seeds", "n", "seed", "truncation"),
    "interpolate": ("seeds", "seed", "frames", "fps", "truncation"),
    "neighbors": ("seeds", "n", "seed", "k", "dataset_root", "truncation"),
    "export": ("format",),
    "classes": ("nrow", "seed", "truncation"),
}
TAKES_CLASS = ("grid", "seeds", "interpolate", "neighbors")  # the modes class= applies to


def check_settings_used(cfg: SampleConfig) -> None:
    """A setting the mode never reads (truncation on export, seeds for a grid) is refused, not ignored."""
    read = set(SETTINGS_READ[cfg.mode])
    if cfg.seeds and "seeds" in read:  # seeds= names every seed, so seed= and n= have nothing left to say
        read -= {"seed", "n"}
    if cfg.mode == "interpolate" and output_path(cfg).suffix.lower() in GRID_SUFFIXES:
        read.discard("fps")  # a still grid has no frame rate
    defaults = SampleConfig()
    for key in ("seeds", "seed", "n", "nrow", "frames", "fps", "truncation", "k", "dataset_root", "format"):
        value = getattr(cfg, key)
        if key not in read and value != getattr(defaults, key):
            given = f" with seeds={cfg.seeds}" if cfg.seeds and key in ("seed", "n") else ""
            unused(
                key,
                value,
                f"mode={cfg.mode}{given} does not use it",
                f"remove {key}= (mode={cfg.mode} reads {', '.join(sorted(read)) or 'no other setting'})",
            )


def asked_classes(cfg: SampleConfig) -> List[Any]:
    """class= as a list: [] when not given, one entry, or several (mode=interpolate)."""
    if cfg.class_ is None:
        return []
    return list(cfg.class_) if isinstance(cfg.class_, (list, tuple, ListConfig)) else [cfg.class_]


def check_class_request(cfg: SampleConfig) -> None:
    """class= where the mode draws a class: one class, or for mode=interpolate several to walk through."""
    asked = asked_classes(cfg)
    if not asked:
        return
    if cfg.mode not in TAKES_CLASS:
        why = "it draws every class" if cfg.mode == "classes" else "the export takes the labels as an input"
        unused(CLASS_KEY, cfg.class_, f"mode={cfg.mode} does not use it: {why}", f"remove {CLASS_KEY}=")
    if len(asked) > 1 and cfg.mode != "interpolate":
        raise UserError(
            f"{CLASS_KEY}={cfg.class_} names {len(asked)} classes; mode={cfg.mode} draws one (e.g. {CLASS_KEY}="
            f"{asked[0]}), and mode=interpolate walks through several"
        )
    if len(asked) > 1 and cfg.seeds:
        unused(
            "seeds",
            cfg.seeds,
            f"a walk through classes ({CLASS_KEY}={cfg.class_}) stays at the latent of seed=",
            "give seed=N instead",
        )


def wanted_classes(cfg: SampleConfig, classes: Sequence[str]) -> Tuple[int, ...]:
    """class= as label indices of this checkpoint's classes."""
    asked = asked_classes(cfg)
    if asked and not classes:
        raise UserError(
            f"{cfg.ckpt} was trained without classes (conditional=false), so there is no class {asked[0]} to "
            f"draw; remove {CLASS_KEY}=, or sample a checkpoint trained with conditional=true"
        )
    if cfg.mode == "classes" and not classes:
        raise UserError(
            f"{cfg.ckpt} was trained without classes (conditional=false): mode=classes needs a checkpoint trained "
            "with conditional=true"
        )
    wanted = tuple(data.class_index(classes, str(name)) for name in asked)
    check_walk(CLASS_KEY, asked, wanted)
    return wanted


def images_requested(cfg: SampleConfig, classes: int = 1) -> int:
    """How many images the mode generates (each held as float32 until written); `classes`: the checkpoint's."""
    if cfg.mode == "export":
        return 0
    if cfg.mode == "classes":
        return cfg.nrow * classes
    if cfg.mode == "interpolate":
        walked_classes = len(asked_classes(cfg))
        keys = walked_classes if walked_classes > 1 else len(interpolation_keys(cfg))
        closed = output_path(cfg).suffix.lower() not in GRID_SUFFIXES  # a movie loops back to its first key
        return (keys if closed else keys - 1) * (cfg.frames if closed else cfg.frames + 1)
    if cfg.mode == "grid" or not cfg.seeds:
        return cfg.n
    return len(parse_seeds(cfg.seeds))


def check_memory(cfg: SampleConfig, train_cfg: DictConfig, classes: int = 1) -> None:
    """The images asked for fit in memory as float32, known once the checkpoint gives their size."""
    pixels = train_cfg.dataset.channels * train_cfg.dataset.image_size**2
    count = images_requested(cfg, classes)
    needed = count * pixels * 4
    where, available = models.device_memory("cpu")
    if needed > available:
        raise UserError(
            f"{count:,} images of {train_cfg.dataset.image_size}px need {needed / 2**30:,.0f} GiB "
            f"as float32, more than the {available / 2**30:,.0f} GiB of {where}; ask for fewer (n, seeds, frames)"
        )


def check_request_seeds(cfg: SampleConfig) -> None:
    """Every seed the mode will use is one torch takes; seeds= is parsed now, before the checkpoint loads."""
    if cfg.mode == "export":
        return
    if cfg.seeds and cfg.mode != "grid":  # a grid always takes n seeds from seed=
        parse_seeds(cfg.seeds)
    else:
        check_seeds("seed", cfg.seed, cfg.seed + (1 if cfg.mode == "interpolate" else cfg.n - 1))
    if cfg.mode == "interpolate":
        interpolation_keys(cfg)


# Where each mode writes without out=: a file, or for mode=seeds a folder (export's default follows format=).
DEFAULT_OUTPUTS = {
    "grid": "grid.png",
    "seeds": "seeds",
    "interpolate": "interpolation.gif",
    "neighbors": "neighbors.png",
    "classes": "classes.png",
}


def output_path(cfg: SampleConfig) -> Path:
    default = EXPORT_FORMATS[cfg.format] if cfg.mode == "export" else DEFAULT_OUTPUTS[cfg.mode]
    return Path(cfg.out or default)


def check_output(cfg: SampleConfig) -> None:
    """out= is something the mode can write, in a folder we can write: known before any work is done."""
    out = output_path(cfg)
    if cfg.mode == "seeds":
        if out.is_file() or out.suffix.lower() in (*GRID_SUFFIXES, MOVIE_SUFFIX):
            raise UserError(
                f"mode=seeds writes one PNG per seed into a folder, but out={out} names a file; pass a "
                f"folder, e.g. out={out.parent / 'seeds'}"
            )
        check_writable_folder("out", out)
        return
    what, suffixes = {
        "grid": ("a grid", GRID_SUFFIXES),
        "interpolate": ("an interpolation (a movie, or a grid with a row per leg)", (MOVIE_SUFFIX, *GRID_SUFFIXES)),
        "neighbors": ("the neighbours panel", GRID_SUFFIXES),
        "classes": ("the classes grid", GRID_SUFFIXES),
        "export": (f"a {cfg.format} export", EXPORT_SUFFIXES[cfg.format]),
    }[cfg.mode]
    check_output_file("out", out, suffixes, what)


def run(cfg: SampleConfig) -> List[Path]:
    """Write what `cfg.mode` asks for; returns the files written."""
    check_sample_config(cfg)
    device = resolve_device(cfg.device)
    G, train_cfg, saved = load_generator(cfg.ckpt, device, cfg.ema)
    if cfg.truncation is not None and cfg.truncation > 1 and train_cfg.generator.z_distribution == "uniform":
        raise UserError(
            f"truncation scales this checkpoint's uniform latents, so it must be in (0, 1]; got {cfg.truncation}"
        )
    classes = tuple(saved.get(CLASSES) or ())
    wanted = wanted_classes(cfg, classes)
    check_memory(cfg, train_cfg, max(1, len(classes)))
    weights = sampling_weights(saved, cfg.ema)[1]
    studio = Studio(G, train_cfg, cfg, device, weights, int(saved[STEP]), classes, wanted)
    with files.write_errors_as_user_errors("free some disk space, or write elsewhere with out=PATH"):
        return MODES[cfg.mode](studio)
