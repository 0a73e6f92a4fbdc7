"""Training images: finding and decoding a data set once, then serving endless shuffled batches.

`load_images(cfg)` returns every image of the configured data set as one uint8 tensor
[N, C, S, S]. MNIST-like sets are small, so their IDX files are parsed on every load. CelebA and
image folders are decoded once (crop, resize, colour conversion) into a `.npy` cache that later
loads memory-map, so a 200k-image set starts in a second instead of minutes. The cache lives in the
user's cache folder ($XDG_CACHE_HOME/dcgan/decoded, else ~/.cache/dcgan/decoded) or in dataset.cache_dir,
never inside the data folder: that folder is the user's, and other tools (torchvision's ImageFolder)
read every subfolder of it as a class.

`check_available(cfg)` finds the data (downloading it where a data set can) before gan-train makes a
run folder, so a run refused for missing data leaves nothing behind.

`load_labels(cfg)` gives the class of each of those images, row for row, for conditional training: MNIST's
label files, mnist_tiny's labels, an image folder's sub-folders, CelebA's attributes (dataset.attributes);
`check_labels_available(cfg)` is its check before the run folder. The Labels type, reading label files and
matching class names live in labels.py.

`ImageBatches` draws batches from that tensor. Its order is a pure function of (seed, epoch), so
a checkpoint only needs {"epoch", "position"} to continue with exactly the batches an
uninterrupted run would have seen.

Every problem with the user's files is raised as `UserError` with a sentence saying what to do.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shlex
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image

from dcgan import files
from dcgan.errors import UserError, at_least, at_most, one_of, unused
from dcgan.labels import (
    DIGIT_CLASSES,
    FASHION_MNIST_CLASSES,
    Labels,
    check_attribute_list,
    check_attributes_known,
    combination_indices,
    combination_names,
    idx_count,
    read_attributes,
    read_idx_labels,
)
from dcgan.labels import class_index as class_index  # conditional training asks data for it, with load_labels


@dataclass
class DatasetConfig:
    name: str = "mnist_tiny"  # in data.DATASETS: mnist | fashion_mnist | celeba | folder | mnist_tiny | yours
    root: str = "data"  # where the data set lives (or is downloaded to)
    image_size: int = 28  # square side in pixels, after crop and resize
    channels: int = 1  # 1 (grayscale) or 3 (RGB); images are converted to this
    split: str = "train"  # train | test (mnist, fashion_mnist); celeba: train | valid | test | all
    download: bool = True  # try torchvision's downloader when the files are missing
    crop: int = 0  # side of the centered square cropped before resizing; 0 = the largest square
    max_images: int = 0  # use only the first N images (0 = all)
    on_bad_file: str = "skip"  # folder/celeba: skip unreadable images with a warning, or error
    cache_dir: Optional[str] = None  # decoded-image cache; None = $XDG_CACHE_HOME/dcgan/decoded, else ~/.cache/...
    num_workers: int = 0  # processes for the one-time JPEG decode; 0 = one per core
    # celeba with conditional=true: the attributes whose 2^k combinations are the classes, e.g. [Smiling,Male]
    attributes: List[str] = field(default_factory=list)


Loader = Callable[[DatasetConfig], torch.Tensor]
LabelsLoader = Callable[[DatasetConfig], Labels]


@dataclass(frozen=True)
class DatasetSpec:
    """A registered data set: its loader, and the facts about it that validation, logs and metrics ask for."""

    load: Loader  # cfg -> every image as uint8 [N, C, S, S]; see load_images
    splits: Tuple[str, ...] = ()  # its dataset.split values; () = it has none, and dataset.split is ignored
    origin: str = ""  # where describe() says the images come from; "" = dataset.root
    labels: Optional[LabelsLoader] = None  # cfg -> the class of each image load() returns; None = no classes


# Every data set by dataset.name, in registration order (the order error messages list them in).
DATASETS: Dict[str, DatasetSpec] = {}


def dataset(name: str, splits: Sequence[str] = (), origin: str = ""):
    """Register `load(cfg) -> uint8 [N, C, S, S]` as the data set `name`, selected by dataset.name=NAME."""

    def register(load: Loader) -> Loader:
        DATASETS[name] = DatasetSpec(load, tuple(splits), origin)
        return load

    return register


def labels_of(name: str):
    """Register `labels(cfg) -> Labels` as the classes of the data set `name` (registered first with `dataset`):
    one class per image `load` returns, in the same order, after the same dataset.max_images cut."""

    def register(labels: LabelsLoader) -> LabelsLoader:
        DATASETS[name] = replace(DATASETS[name], labels=labels)
        return labels

    return register


def validate_dataset(d: DatasetConfig | DictConfig) -> None:
    one_of("dataset.name", d.name, tuple(DATASETS))
    one_of("dataset.channels", d.channels, (1, 3))
    at_least("dataset.image_size", d.image_size, 8)
    at_least("dataset.max_images", d.max_images, 0)
    at_least("dataset.crop", d.crop, 0)
    at_least("dataset.num_workers", d.num_workers, 0)
    at_most(
        "dataset.num_workers", d.num_workers, MAX_WORKERS, "each worker is a process decoding images (0 = one per core)"
    )
    one_of("dataset.on_bad_file", d.on_bad_file, ("skip", "error"))
    # Any split some data set has passes here (data sets without splits ignore it); then the chosen one's own.
    one_of("dataset.split", d.split, tuple(dict.fromkeys(s for spec in DATASETS.values() for s in spec.splits)))
    _check_split(d)
    attributes = _attributes(d)
    if attributes and d.name != "celeba":
        unused(
            "dataset.attributes",
            f"[{','.join(attributes)}]",
            f"only CelebA has attributes, and dataset.name={d.name}",
            "remove dataset.attributes (the classes of " + d.name + " come from its own labels)",
        )
    check_attribute_list(attributes)


def _attributes(d: DatasetConfig | DictConfig) -> List[str]:
    # getattr: a checkpoint's config written before dataset.attributes existed has no such key.
    return [str(a) for a in getattr(d, "attributes", None) or []]


log = logging.getLogger(__name__)

MAX_WORKERS = 256  # decode processes: more than the cores of any one machine we know of
MNIST_TINY = Path(__file__).parent / "assets" / "mnist_tiny.npz"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# Bump when decoding changes (filter, colour handling), so caches made by older code are not used.
CACHE_FORMAT_VERSION = 1
# Starting worker processes costs more than decoding a few hundred small images in-process.
POOL_MIN_FILES = 256
CELEBA_SPLITS = {"train": "0", "valid": "1", "test": "2"}
IDX_IMAGES_MAGIC = 0x00000803
BAD_FILES_SHOWN = 10


def load_images(cfg: DatasetConfig) -> torch.Tensor:
    """All images of the data set as a uint8 CPU tensor [N, C, S, S], S = cfg.image_size, C = cfg.channels.

    CelebA and folder data sets come back memory-mapped from the decode cache. Only the first
    cfg.max_images are kept, so a loader may ignore that setting (the shipped ones cut before decoding).
    """
    _check_split(cfg)
    images = _first(_spec(cfg.name).load(cfg), cfg.max_images)
    expected = (cfg.channels, cfg.image_size, cfg.image_size)
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != expected:
        got, wanted = f"{images.dtype} {tuple(images.shape)}", ", ".join(map(str, expected))
        raise ValueError(f"data set {cfg.name}'s loader returned {got}, not uint8 [N, {wanted}]")
    return images


def split_of(cfg: DatasetConfig | DictConfig) -> Optional[str]:
    """The split the data set reads, or None for a data set without splits (folder, mnist_tiny)."""
    return cfg.split if _spec(cfg.name).splits else None


def describe(cfg: DatasetConfig, num_images: Optional[int] = None) -> str:
    """A short line for logs, e.g. "mnist (train, 60000 images, 28x28x1) from data"."""
    split = split_of(cfg)
    parts = [] if split is None else [split]
    if num_images is not None:
        parts.append(f"{num_images} images")
    parts.append(f"{cfg.image_size}x{cfg.image_size}x{cfg.channels}")
    return f"{cfg.name} ({', '.join(parts)}) from {_spec(cfg.name).origin or cfg.root}"


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(f"unknown dataset.name {name!r}; use {_either(tuple(DATASETS))}")
    return DATASETS[name]


def _check_split(cfg: DatasetConfig | DictConfig) -> None:
    splits = _spec(cfg.name).splits
    if splits and cfg.split not in splits:
        raise UserError(f"dataset.split must be {_either(splits)} for {cfg.name}, got {cfg.split!r}")


def _either(names: Tuple[str, ...]) -> str:
    """("a", "b", "c") -> "a, b or c"."""
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else "".join(names)


def _first(images: torch.Tensor, max_images: int) -> torch.Tensor:
    return images[:max_images] if max_images > 0 else images


# --------------------------------------------------------------------------------------------
# The shipped data sets: one registered loader each (docs/extending.md adds another)


@dataset("mnist", splits=("train", "test"))
def mnist_like_images(cfg: DatasetConfig) -> torch.Tensor:
    """MNIST or Fashion-MNIST, by cfg.name: IDX files under dataset.root, else torchvision's download."""
    return _gray_to_config(_first(_load_mnist_like(cfg), cfg.max_images), cfg)


dataset("fashion_mnist", splits=("train", "test"))(mnist_like_images)


@dataset("celeba", splits=("train", "valid", "test", "all"))
def celeba_images(cfg: DatasetConfig) -> torch.Tensor:
    return _cached_decode(_find_celeba(cfg), cfg)


@dataset("folder")
def folder_images(cfg: DatasetConfig) -> torch.Tensor:
    return _cached_decode(_find_folder(cfg), cfg)


@dataset("mnist_tiny", origin="the bundled MNIST subset")
def mnist_tiny_images(cfg: DatasetConfig) -> torch.Tensor:
    with np.load(MNIST_TINY) as archive:
        gray = torch.from_numpy(archive["images"])
    return _gray_to_config(_first(gray, cfg.max_images), cfg)


# --------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST


def _load_mnist_like(cfg: DatasetConfig) -> torch.Tensor:
    """The split's images as uint8 [N, 28, 28]: from IDX files on disk, else via torchvision."""
    path = _find_idx(cfg)
    if path is not None:
        return torch.from_numpy(read_idx_images(path))
    return _download_mnist_like(cfg)


def _find_idx(cfg: DatasetConfig | DictConfig, part: str = "images") -> Optional[Path]:
    """The split's IDX file of `part` (images or labels) under dataset.root (plain, torchvision's layout, or
    raw/), or None."""
    root, stem = Path(cfg.root).expanduser(), _idx_stem(cfg, part)
    for directory in (root, _torchvision_raw(cfg), root / "raw"):
        # The uncompressed file, when torchvision left both, skips a gunzip.
        for path in (directory / stem, directory / f"{stem}.gz"):
            if path.is_file():
                return path
    return None


def _idx_stem(cfg: DatasetConfig | DictConfig, part: str = "images") -> str:
    """train-images-idx3-ubyte, t10k-labels-idx1-ubyte, ...: the names MNIST's files have everywhere."""
    dimensions = 3 if part == "images" else 1
    return f"{'train' if cfg.split == 'train' else 't10k'}-{part}-idx{dimensions}-ubyte"


def _torchvision_raw(cfg: DatasetConfig | DictConfig) -> Path:
    """Where torchvision keeps (and downloads) the IDX files: ROOT/MNIST/raw, ROOT/FashionMNIST/raw."""
    return Path(cfg.root).expanduser() / ("MNIST" if cfg.name == "mnist" else "FashionMNIST") / "raw"


def read_idx_images(path: Path) -> np.ndarray:
    """Parse an IDX image file (optionally gzipped): uint8 [N, rows, cols]."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError, zlib.error) as error:
        raise UserError(f"{path} cannot be read ({error}); delete it and download it again") from None
    if len(data) < 16:
        raise UserError(
            f"{path} is too short to be an IDX image file ({len(data)} bytes); delete it and download it again"
        )
    magic, count, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != IDX_IMAGES_MAGIC:
        raise UserError(
            f"{path} is not an IDX image file (magic number {magic:#010x}, expected "
            f"{IDX_IMAGES_MAGIC:#010x}); check that it is the *-images-idx3-ubyte file"
        )
    expected = 16 + count * rows * cols
    if len(data) != expected:
        raise UserError(
            f"{path} is truncated or corrupt ({len(data)} bytes, expected {expected} for {count} images of "
            f"{rows}x{cols}); delete it and download it again"
        )
    # A copy, because torch warns about tensors over read-only buffers.
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols).copy()


def _download_mnist_like(cfg: DatasetConfig | DictConfig, part: str = "images") -> torch.Tensor:
    """The split's images (uint8 [N, 28, 28]) or labels (int64 [N]) through torchvision, downloading them
    into dataset.root when dataset.download allows."""
    from torchvision import datasets

    root, stem = Path(cfg.root).expanduser(), _idx_stem(cfg, part)
    dataset_class, title = (
        (datasets.MNIST, "MNIST") if cfg.name == "mnist" else (datasets.FashionMNIST, "Fashion-MNIST")
    )
    raw = _torchvision_raw(cfg)
    made = [folder for folder in (root, raw.parent, raw) if not folder.exists()]
    try:
        downloaded = dataset_class(str(root), train=cfg.split == "train", download=cfg.download)
    except Exception as error:  # offline downloads fail as URLError, RuntimeError, socket errors...
        for folder in reversed(made):  # the folders torchvision made for it: a refused command makes none
            with contextlib.suppress(OSError):  # rmdir removes a folder only if it is empty
                folder.rmdir()
        reason = " ".join(str(error).split()) or type(error).__name__
        what = f"{title}'s labels" if part == "labels" else title
        raise UserError(
            f"could not find or download {what} under {root} ({reason}). With no internet, put the IDX "
            f"{part[:-1]} file {stem}.gz in {root}, or point dataset.root at a folder that holds it."
        ) from None
    return downloaded.data if part == "images" else downloaded.targets.long()


def _gray_to_config(gray: torch.Tensor, cfg: DatasetConfig) -> torch.Tensor:
    """uint8 [N, H, W] -> uint8 [N, C, S, S]: resized once here so training never resizes."""
    images = gray.unsqueeze(1)
    size = cfg.image_size
    if images.shape[-2:] != (size, size):
        resized = torch.empty((len(images), 1, size, size), dtype=torch.uint8)
        # Chunks keep the float copy small (60k images at 64x64 would be a gigabyte at once).
        for start in range(0, len(images), 4096):
            chunk = images[start : start + 4096].float()
            chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            resized[start : start + 4096] = chunk.round_().clamp_(0, 255).to(torch.uint8)
        images = resized
    if cfg.channels == 3:
        images = images.repeat(1, 3, 1, 1)
    return images.contiguous()


# --------------------------------------------------------------------------------------------
# Where encoded images come from: a folder or a zip archive


@dataclass(frozen=True)
class _Source:
    """The encoded images of a data set: files in a folder, or members of a zip archive."""

    location: Path  # the folder or the zip file
    entries: Tuple[Tuple[str, int, int], ...]  # (relative name, size, mtime or CRC), in data set order
    is_zip: bool

    @property
    def names(self) -> List[str]:
        return [entry[0] for entry in self.entries]

    def select(self, keep: Sequence[bool]) -> "_Source":
        return replace(self, entries=tuple(entry for entry, kept in zip(self.entries, keep, strict=False) if kept))

    def first(self, count: int) -> "_Source":
        return replace(self, entries=self.entries[:count]) if count > 0 else self


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _folder_source(folder: Path, recursive: bool) -> _Source:
    if recursive:
        paths = []
        for directory, subdirectories, files in os.walk(folder):
            # Hidden folders hold tool output (.ipynb_checkpoints, the .dcgan-cache older versions wrote), not data.
            subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
            paths.extend(Path(directory) / f for f in files if _is_image_name(f))
    else:
        paths = [p for p in folder.iterdir() if p.is_file() and _is_image_name(p.name)]
    entries = []
    for path in sorted(paths):
        stat = path.stat()
        entries.append((path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns))
    return _Source(folder, tuple(entries), is_zip=False)


def _zip_source(archive: Path) -> _Source:
    _reject_non_zip(archive)
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = [
                m
                for m in zipped.infolist()
                if not m.is_dir() and _is_image_name(m.filename) and not m.filename.startswith("__MACOSX/")
            ]
    except (zipfile.BadZipFile, OSError) as error:
        raise UserError(f"{archive} is not a readable zip file ({error}); delete it and download it again") from None
    members.sort(key=lambda m: m.filename)
    entries = tuple((m.filename, m.file_size, m.CRC) for m in members)
    return _Source(archive, entries, is_zip=True)


def _reject_non_zip(archive: Path) -> None:
    """Explain the usual non-zip found here: Google Drive's quota page saved under the zip's name."""
    if zipfile.is_zipfile(archive):
        return
    with open(archive, "rb") as file:
        head = file.read(65536).decode("utf-8", errors="replace")
    lowered = head.lstrip().lower()
    if lowered.startswith(("<!doctype html", "<html")) or "quota exceeded" in lowered or "google drive" in lowered:
        raise UserError(
            f"{archive} is a Google Drive web page (download quota exceeded), not the data: delete it and download "
            "img_align_celeba.zip by hand (from the CelebA page, mmlab.ie.cuhk.edu.hk/projects/CelebA.html) into the "
            "same folder."
        )
    raise UserError(
        f"{archive} is not a zip file (an interrupted or corrupt download?); delete it and download it again"
    )


def _find_celeba(cfg: DatasetConfig) -> _Source:
    """CelebA's aligned images, from the first layout that exists, filtered to cfg.split."""
    root = Path(cfg.root).expanduser()
    source = _celeba_layout(root)
    failure = ""
    if source is None and cfg.download:
        failure = _try_torchvision_celeba(root)
        source = _celeba_layout(root)
    if source is None:
        raise _celeba_missing(cfg, failure)
    return _celeba_split(source, root, cfg.split)


# What to fetch by hand; the sizes are those of the files on the CelebA page (list_eval_partition.txt: 202,599
# lines of 14 bytes).
CELEBA_PAGE = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
CELEBA_FILES = "img_align_celeba.zip (1.4 GB, the aligned faces)"
CELEBA_PARTITION = "list_eval_partition.txt (2.8 MB; only for dataset.split=train|valid|test)"


def _celeba_missing(cfg: DatasetConfig | DictConfig, failure: str) -> UserError:
    """One message: what to download, where to put it (an absolute path), and the command to run then."""
    root = Path(cfg.root).expanduser().resolve()
    tried = f" (the automatic download failed: {failure})" if failure else ""
    return UserError(
        f"no CelebA images under {root}{tried}. Download {CELEBA_FILES} and {CELEBA_PARTITION} from {CELEBA_PAGE} "
        f"(Google Drive links there), put both in {root / 'celeba'}/ (the zip is read in place, no need to unzip), "
        f"then run: {rerun_command(cfg.name, root)}"
    )


def rerun_command(name: str, root: Path) -> str:
    """The command that was run, with dataset.root set to `root`; `gan-train dataset=NAME dataset.root=ROOT` when it
    was not a gan-* command (a test, a script)."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if not program.startswith("gan-"):
        program, arguments = "gan-train", [f"dataset={name}"]
    else:
        arguments = [arg for arg in sys.argv[1:] if not arg.startswith("dataset.root=")]
    return shlex.join([program, *arguments, f"dataset.root={root}"])


def _celeba_layout(root: Path) -> Optional[_Source]:
    # Extracted folders first: reading loose files is faster than inflating a zip.
    for folder in (root / "celeba" / "img_align_celeba", root / "img_align_celeba", root):
        if folder.is_dir():
            source = _folder_source(folder, recursive=False)
            if source.names:
                return source
    for archive in (root / "celeba" / "img_align_celeba.zip", root / "img_align_celeba.zip"):
        if archive.is_file():
            return _zip_source(archive)
    return None


def _try_torchvision_celeba(root: Path) -> str:
    """torchvision's download (Google Drive, through the gdown package); "" when it worked, else why not."""
    from torchvision import datasets

    try:
        datasets.CelebA(str(root), split="all", download=True)
    except Exception as error:  # any failure leads to the same advice, given by the caller
        reason = " ".join(str(error).split()) or type(error).__name__
        # torchvision's own advice (pip install gdown) would be a second instruction beside ours: state the fact.
        return "torchvision needs the gdown package for it" if "gdown" in reason else reason[:160]
    return ""


def _celeba_list_folders(source: _Source, root: Path) -> Tuple[Path, ...]:
    """Where CelebA's list files (list_eval_partition.txt, list_attr_celeba.txt) may be: beside the image folder
    or zip, in root/celeba (torchvision's layout), or at the top of the root."""
    beside = source.location.parent if source.location != root else root
    return tuple(dict.fromkeys((beside, root / "celeba", root)))


def _celeba_list_file(source: _Source, root: Path, name: str) -> Optional[Path]:
    return next((folder / name for folder in _celeba_list_folders(source, root) if (folder / name).is_file()), None)


def _celeba_split(source: _Source, root: Path, split: str) -> _Source:
    partition_file = _celeba_list_file(source, root, "list_eval_partition.txt")
    if partition_file is None:
        log.info(
            "no list_eval_partition.txt beside the CelebA images: using all %d images for split=%s",
            len(source.names),
            split,
        )
        return source
    if split == "all":
        return source
    partition: Dict[str, str] = {}
    for line in partition_file.read_text().splitlines():
        fields = line.split()
        if len(fields) == 2:
            partition[fields[0]] = fields[1]
    wanted = CELEBA_SPLITS[split]
    return source.select([partition.get(Path(name).name) == wanted for name in source.names])


def _find_folder(cfg: DatasetConfig) -> _Source:
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset.root {root} is not a folder; point dataset.root at a folder of images")
    return _folder_source(root, recursive=True)


def check_available(cfg: DatasetConfig | DictConfig) -> None:
    """Raise the UserError a load would, for data that is missing (after a download where dataset.download
    allows one), without decoding anything. gan-train calls it before Hydra makes the run folder, so a run
    refused for its data leaves no folder behind. Data sets registered elsewhere are checked when they load."""
    _check_split(cfg)
    if cfg.name in ("mnist", "fashion_mnist") and _find_idx(cfg) is None:
        _download_mnist_like(cfg)  # a UserError saying where to put the file when it fails
    elif cfg.name == "celeba":
        _require_images(_find_celeba(cfg).first(cfg.max_images))
    elif cfg.name == "folder":
        _require_images(_find_folder(cfg))


def _require_images(source: _Source) -> None:
    if not source.names:
        raise UserError(
            f"no images found in {source.location} (looked for {', '.join(IMAGE_EXTENSIONS)}); "
            "point dataset.root at a folder that holds images"
        )


# --------------------------------------------------------------------------------------------
# Class labels, for conditional training


def load_labels(cfg: DatasetConfig) -> Labels:
    """The class of each image load_images(cfg) returns, row for row: the same split, the same dataset.max_images
    cut, the same unreadable files skipped. UserError when the data set has no classes."""
    _check_split(cfg)
    spec = _spec(cfg.name)
    if spec.labels is None:
        raise _no_classes(cfg)
    labels = spec.labels(cfg)
    # Cut here as load_images cuts, so a registered labels loader may ignore dataset.max_images as its images may.
    return Labels(_first(labels.indices, cfg.max_images), tuple(labels.names))


def check_labels_available(cfg: DatasetConfig | DictConfig) -> Optional[Tuple[str, ...]]:
    """Raise the UserError load_labels would for missing or absent labels, without decoding any image (a missing
    MNIST label file is downloaded where dataset.download allows). gan-train calls it, as it calls
    check_available, before the run folder exists. Returns the class names (what a resume must find again), or
    None for data sets registered elsewhere: those are checked when they load."""
    _check_split(cfg)
    if _spec(cfg.name).labels is None:
        raise _no_classes(cfg)
    if cfg.name in ("mnist", "fashion_mnist"):
        # A label file is 60 kB and the images' count is in their header: nothing decoded.
        return mnist_like_labels(cfg).names
    if cfg.name == "folder":
        return _folder_classes(_find_folder(cfg))[0]
    if cfg.name == "celeba":
        _celeba_attribute_file(cfg, _find_celeba(cfg))
        return combination_names(_attributes(cfg))
    return DIGIT_CLASSES if cfg.name == "mnist_tiny" else None


def _no_classes(cfg: DatasetConfig | DictConfig) -> UserError:
    labelled = _either(tuple(name for name, spec in DATASETS.items() if spec.labels is not None))
    return UserError(
        f"dataset.name={cfg.name} has no class labels: conditional=true needs a data set with classes ({labelled}, "
        "or one whose labels are registered with data.labels_of); or train with conditional=false"
    )


@labels_of("mnist")
def mnist_like_labels(cfg: DatasetConfig) -> Labels:
    """The split's label file (train-labels-idx1-ubyte[.gz], ...) found where the images are, else torchvision's."""
    names = DIGIT_CLASSES if cfg.name == "mnist" else FASHION_MNIST_CLASSES
    path = _find_idx(cfg, "labels")
    if path is None:
        indices = _download_mnist_like(cfg, "labels")
        path = _find_idx(cfg, "labels") or Path(cfg.root) / _idx_stem(cfg, "labels")
    else:
        indices = torch.from_numpy(read_idx_labels(path, len(names))).long()
    images = _find_idx(cfg)
    if images is not None and idx_count(images) != len(indices):
        raise UserError(
            f"{path} has {len(indices)} labels but {images} has {idx_count(images)} images, so they cannot be paired: "
            "one is damaged or from another split; delete both and download them again"
        )
    return Labels(_first(indices, cfg.max_images), names)


labels_of("fashion_mnist")(mnist_like_labels)


@labels_of("mnist_tiny")
def mnist_tiny_labels(cfg: DatasetConfig) -> Labels:
    with np.load(MNIST_TINY) as archive:
        indices = torch.from_numpy(archive["labels"].astype(np.int64))
    return Labels(_first(indices, cfg.max_images), DIGIT_CLASSES)


@labels_of("folder")
def folder_labels(cfg: DatasetConfig) -> Labels:
    """torchvision's ImageFolder convention: each first-level sub-folder is a class, classes in sorted order; a
    file deeper down belongs to its first-level folder."""
    source = _find_folder(cfg)
    names, classes = _folder_classes(source)
    kept = _decoded(source, cfg)[1]  # which files the cache holds: unreadable ones were skipped
    return Labels(torch.from_numpy(classes[: len(kept)][kept]), names)


def _folder_classes(source: _Source) -> Tuple[Tuple[str, ...], np.ndarray]:
    """(class names, the class index of each file of `source`), or the UserError saying why it has no classes.
    The classes come from the whole folder, so a dataset.max_images cut never renumbers them."""
    tops, folders = [], []
    for name in source.names:
        folder, slash, _ = name.partition("/")
        (folders if slash else tops).append(folder)
    where = f"dataset.name=folder at {printable(str(source.location.resolve()))}"
    layout = "one sub-folder of images per class (the ImageFolder layout)"
    if not folders:
        raise UserError(f"{where} has no classes: conditional=true needs {layout}; or train with conditional=false")
    if tops:
        shown = ", ".join(printable(name) for name in tops[:3]) + (", ..." if len(tops) > 3 else "")
        raise UserError(
            f"{where} has {len(tops)} images outside any class sub-folder ({shown}): conditional=true needs every "
            f"image in {layout}; move them into one, or train with conditional=false"
        )
    names = tuple(sorted(set(folders)))
    if len(names) < 2:
        raise UserError(
            f"{where} has one class, {printable(names[0])}/: conditional=true needs at least 2 classes, {layout}; or "
            "train with conditional=false"
        )
    index = {name: i for i, name in enumerate(names)}
    return names, np.array([index[folder] for folder in folders], dtype=np.int64)


@labels_of("celeba")
def celeba_labels(cfg: DatasetConfig) -> Labels:
    """The 2^k combinations of the k dataset.attributes, from list_attr_celeba.txt."""
    source = _find_celeba(cfg).first(cfg.max_images)
    path = _celeba_attribute_file(cfg, source)
    _require_images(source)
    attributes = _attributes(cfg)
    listed, present = read_attributes(path, attributes)
    rows = _attribute_rows(listed, source.names, path)
    kept = _decoded(source, cfg)[1]  # which files the cache holds: unreadable ones were skipped
    return Labels(combination_indices(present[rows][kept]), combination_names(attributes))


def _celeba_attribute_file(cfg: DatasetConfig | DictConfig, source: _Source) -> Path:
    """list_attr_celeba.txt, where list_eval_partition.txt may be, once dataset.attributes are known to be in it."""
    attributes = _attributes(cfg)
    if not attributes:
        raise UserError(
            "dataset.name=celeba has no classes until you choose attributes: conditional=true needs e.g. "
            "dataset.attributes=[Smiling,Male] (k attributes make 2^k classes; the names are on the second line of "
            "list_attr_celeba.txt); or train with conditional=false"
        )
    root = Path(cfg.root).expanduser()
    path = _celeba_list_file(source, root, "list_attr_celeba.txt")
    if path is None:
        folders = ", ".join(str(folder.resolve()) for folder in _celeba_list_folders(source, root))
        raise UserError(
            f"no list_attr_celeba.txt beside the CelebA images (looked in {folders}): dataset.attributes reads "
            f"it; download it from {CELEBA_PAGE} (Google Drive links there) into {(root / 'celeba').resolve()}/, "
            "or train with conditional=false"
        )
    check_attributes_known(attributes, path)
    return path


def _attribute_rows(listed: np.ndarray, names: Sequence[str], path: Path) -> np.ndarray:
    """The row of list_attr_celeba.txt of each image (found by file name, as the zip holds img_align_celeba/...)."""
    wanted = np.array([name.rpartition("/")[2] for name in names], dtype=str)
    order = np.argsort(listed, kind="stable")
    rows = order[np.minimum(np.searchsorted(listed, wanted, sorter=order), max(len(listed) - 1, 0))]
    missing = wanted[listed[rows] != wanted] if len(listed) else wanted
    if len(missing):
        raise UserError(
            f"{len(missing)} CelebA images have no line in {path} (e.g. {printable(str(missing[0]))}): it belongs "
            "to another copy of CelebA or is damaged; download list_attr_celeba.txt again"
        )
    return rows


# --------------------------------------------------------------------------------------------
# Decoding one image


def _decode_image(file: BinaryIO, size: int, channels: int, crop: int) -> np.ndarray:
    """One encoded image -> uint8 [C, size, size]: centre square crop, antialiased resize, colour convert."""
    with Image.open(file) as opened:
        opened.load()  # decode fully now, so a truncated file fails here and not later
        image = _convert_mode(opened, channels)
        width, height = image.size
        side = min(crop or min(width, height), width, height)  # a crop larger than the image takes the largest square
        left, top = (width - side) // 2, (height - side) // 2
        # Pillow's resize filters widen with the scale factor when shrinking, so BICUBIC is antialiased.
        square = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(square, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def _convert_mode(image: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode -> "L" or "RGB".

    Transparent pixels are composited onto black, matching the dark background of digit-like data.
    16-bit images are scaled to 8 bits (Pillow's own convert would clip everything above 255).
    """
    target = "L" if channels == 1 else "RGB"
    if image.mode.startswith("I"):
        sixteen_bit = np.asarray(image).astype(np.float64).clip(0, 65535)
        image = Image.fromarray(np.rint(sixteen_bit / 257).astype(np.uint8), mode="L")
    elif image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return image if image.mode == target else image.convert(target)


class _Decoder:
    """Decodes one name of a `_Source`. Picklable, so pool workers each open the zip for themselves."""

    def __init__(self, source: _Source, size: int, channels: int, crop: int) -> None:
        self.location, self.is_zip = source.location, source.is_zip
        self.size, self.channels, self.crop = size, channels, crop
        self._zip: Optional[zipfile.ZipFile] = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None}

    def __call__(self, name: str) -> Tuple[Optional[np.ndarray], str]:
        """(pixels, "") or (None, why the file could not be decoded)."""
        try:
            if self.is_zip:
                if self._zip is None:
                    self._zip = zipfile.ZipFile(self.location)
                file: BinaryIO = io.BytesIO(self._zip.read(name))
            else:
                file = open(self.location / name, "rb")
            with file:
                return _decode_image(file, self.size, self.channels, self.crop), ""
        except Exception as error:  # a bad file can fail in many ways inside Pillow; each just makes it "bad"
            return None, f"{type(error).__name__}: {error}"

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


# --------------------------------------------------------------------------------------------
# The decode-once cache


def _cached_decode(source: _Source, cfg: DatasetConfig) -> torch.Tensor:
    return _decoded(source, cfg)[0]


def _decoded(source: _Source, cfg: DatasetConfig | DictConfig) -> Tuple[torch.Tensor, np.ndarray]:
    """(the images of `source`, cut to dataset.max_images, from the cache, decoding them first where needed;
    which of its files they are, bool per file: False for an unreadable one that was skipped)."""
    source = source.first(cfg.max_images)
    _require_images(source)
    path = _cache_path(source, cfg)
    cached = _open_cache(path, len(source.entries))
    if cached is not None:
        return cached
    _make_folder(path.parent)
    try:
        _decode_into(path, source, cfg)
    except OSError as error:  # bad image files are caught per file, so this is the cache itself
        raise UserError(
            f"cannot write the decoded-image cache {path} ({error}); free some disk space or set "
            "dataset.cache_dir to another folder"
        ) from None
    cached = _open_cache(path, len(source.entries))
    assert cached is not None, f"{path} was just written"
    return cached


def _cache_path(source: _Source, cfg: DatasetConfig | DictConfig) -> Path:
    key_fields = {
        "version": CACHE_FORMAT_VERSION,
        # Where the data is, and its fingerprint (names, sizes, mtimes or CRCs): two copies of one data set,
        # or a folder edited in place, never share a cache file.
        "location": str(source.location.resolve()),
        "files": source.entries,
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "crop": cfg.crop,
        "split": cfg.split,
        "max_images": cfg.max_images,
        "on_bad_file": cfg.on_bad_file,  # an "error" run must not accept a cache that skipped bad files
    }
    key = hashlib.sha1(json.dumps(key_fields).encode()).hexdigest()
    return cache_folder(cfg) / f"{cfg.name}-{cfg.image_size}px-{cfg.channels}ch-{key[:16]}.npy"


def _kept_path(path: Path) -> Path:
    """Beside each cached .npy: which files of the source its rows are (bool per file, as .npy data), so labels
    line up with images when unreadable files were skipped."""
    return path.with_suffix(".kept")


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/dcgan, else ~/.cache/dcgan: the XDG convention, so a job (or a test) can point it elsewhere."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dcgan"


def cache_folder(cfg: DatasetConfig | DictConfig) -> Path:
    """Where decoded images are cached: dataset.cache_dir, else the user's cache folder (never the data folder)."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else user_cache_dir() / "decoded"


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"cannot make the decoded-image cache folder {folder} ({error.strerror or error}); set "
            "dataset.cache_dir to a writable folder"
        ) from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"cannot write the decoded-image cache to {folder}; set dataset.cache_dir to a writable folder")


def _open_cache(path: Path, count: int) -> Optional[Tuple[torch.Tensor, np.ndarray]]:
    """The cached images and which of the `count` files they are, or None when they must be decoded (again)."""
    # A cache without its .kept file was made by an older version, which did not record skipped files.
    if not path.is_file() or not _kept_path(path).is_file():
        return None
    try:
        # Copy-on-write mapping: pages are shared with the page cache, and the array is writable,
        # which torch.from_numpy wants (it warns about read-only arrays).
        images = torch.from_numpy(np.load(path, mmap_mode="c"))
        kept = np.load(_kept_path(path))
    except (OSError, ValueError) as error:
        log.warning("ignoring unreadable cache %s (%s); decoding again", path, error)
        return None
    if kept.dtype != np.bool_ or kept.shape != (count,) or int(kept.sum()) != len(images):
        log.warning("ignoring cache %s: its .kept file does not match it; decoding again", path)
        return None
    return images, kept


def _decode_into(path: Path, source: _Source, cfg: DatasetConfig) -> None:
    """Decode every image of `source` into the .npy file `path`, atomically: only a complete cache ever gets the
    name that is trusted. Two runs may decode one data set at once, so each writes a temporary file of its own."""
    log.info("decoding %d images from %s into %s (once; later runs reuse it)", len(source.names), source.location, path)

    def decode(temporary: Path) -> None:
        kept = _decode_to(temporary, source, cfg)
        # Given its final name before the images get theirs, so a cache that exists always has its .kept file.
        files.atomic_create(_kept_path(path), lambda kept_temporary: _save_npy(kept_temporary, kept), unique=True)

    files.atomic_create(path, decode, unique=True)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as file:  # a file, not a name: np.save would append .npy to a name
        np.save(file, array)


def _decode_to(path: Path, source: _Source, cfg: DatasetConfig) -> np.ndarray:
    """Decode `source` into the .npy file `path`; returns which files were decoded (bool per file)."""
    from tqdm import tqdm

    count = len(source.names)
    size, channels = cfg.image_size, cfg.channels
    decoder = _Decoder(source, size, channels, cfg.crop)
    workers = cfg.num_workers or os.cpu_count() or 1
    pool = multiprocessing.Pool(workers) if count >= POOL_MIN_FILES and workers > 1 else None
    try:
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, channels, size, size))
        # imap hands results back in order as they are ready, so memory holds only a few chunks.
        results = pool.imap(decoder, source.names, chunksize=64) if pool else map(decoder, source.names)
        written, bad, kept = 0, [], np.zeros(count, dtype=bool)
        pairs = zip(source.names, results, strict=False)
        progress = tqdm(pairs, total=count, desc="decoding images", disable=count < POOL_MIN_FILES)
        for row, (name, (pixels, reason)) in enumerate(progress):
            if pixels is None:
                bad.append((name, reason))
            else:
                array[written] = pixels
                written += 1
                kept[row] = True
        array.flush()
        del array
        _report_bad_files(bad, count, source.location, cfg.on_bad_file)
        if written < count:
            _shrink_npy(path, written)
        return kept
    finally:
        if pool is not None:
            pool.terminate()
        decoder.close()


def _report_bad_files(bad: List[Tuple[str, str]], count: int, location: Path, on_bad_file: str) -> None:
    if not bad:
        return
    names = ", ".join(printable(name) for name, _ in bad[:BAD_FILES_SHOWN])
    if len(bad) > BAD_FILES_SHOWN:
        names += f" and {len(bad) - BAD_FILES_SHOWN} more"
    first_reason, location = printable(bad[0][1]), printable(str(location))
    if on_bad_file == "error":
        raise UserError(
            f"{len(bad)} image files in {location} cannot be read: {names} (first error: {first_reason}); "
            "fix or delete them, or set dataset.on_bad_file=skip"
        )
    if len(bad) == count:
        raise UserError(
            f"no images found in {location}: all {count} image files are unreadable ({names}; first error: "
            f"{first_reason})"
        )
    log.warning("skipped %d unreadable image files in %s: %s", len(bad), location, names)


def printable(name: str) -> str:
    """A file name as text any log can write: bytes that are not UTF-8 (Linux allows them in names, and
    Python keeps them as surrogates) become \\xNN escapes instead of a logging error."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _shrink_npy(path: Path, rows: int) -> None:
    """Keep the first `rows` images of an .npy file (the others were left blank by skipped files)."""

    def copy_rows(shrunk_path: Path) -> None:
        full = np.load(path, mmap_mode="r")
        shrunk = np.lib.format.open_memmap(shrunk_path, mode="w+", dtype=full.dtype, shape=(rows, *full.shape[1:]))
        for start in range(0, rows, 4096):
            stop = min(start + 4096, rows)
            shrunk[start:stop] = full[start:stop]
        shrunk.flush()
        del shrunk, full  # both maps closed before the rename

    files.atomic_create(path, copy_rows)


# --------------------------------------------------------------------------------------------
# Batches


class ImageBatches:
    """Endless, shuffled batches of float images in [-1, 1] on `device`, drawn from uint8 data, with their class
    labels when there are any (conditional=true).

    Epoch e visits the images in the order torch.randperm(N) under seed (seed * 1_000_003 + e), in
    global batches of batch_size * world_size; rank r takes the r-th slice of each global batch. So N
    processes together train on exactly the batches one process would with the whole batch, and each
    image is seen at most once per epoch (the last partial global batch is dropped). Within a batch the
    images keep the permutation's order, so N ranks' batches laid end to end are the one process's batch
    image for image (a conditional run pairs the i-th image's class with the i-th latent: the pairs agree
    too). Images held on the CPU are read in ascending order, which reads a memory-mapped cache
    sequentially, and put back in the batch's order.
    """

    def __init__(
        self,
        images: torch.Tensor,
        batch_size: int,
        device: torch.device,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        labels: Optional[torch.Tensor] = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels is not None and (labels.dtype != torch.int64 or tuple(labels.shape) != (len(images),)):
            raise ValueError(f"expected int64 labels [{len(images)}], got {labels.dtype} {tuple(labels.shape)}")
        self.device = torch.device(device)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_images = len(images)
        self.batches_per_epoch = self.num_images // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            per_rank = f" per process over {world_size} processes" if world_size > 1 else ""
            raise UserError(
                f"the data set has {self.num_images} images, fewer than one batch of "
                f"{batch_size}{per_rank}; lower trainer.batch_size"
            )
        self.on_device = self.device.type == "cuda" and _fits_on_gpu(images, self.device)
        # Holding all images on the GPU makes a batch a single gather, with no host copy per step.
        self.images = images.to(self.device) if self.on_device else images
        self.labels = labels.to(self.device) if labels is not None and self.on_device else labels
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """This rank's batches of epoch `epoch` as image indices [batches_per_epoch, batch_size].

        Drawn on the CPU (the same order on every device), then moved once to where the images are, so a
        step takes its batch with a device-side slice and gather: nothing crosses from host to device, and
        the host never waits for the GPU, between epochs.
        """
        # torch reads a seed as 64 unsigned bits, so wrapping keeps every order it made before and never overflows.
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**64)
        permutation = torch.randperm(self.num_images, generator=generator)
        global_batches = permutation[: self.batches_per_epoch * self.batch_size * self.world_size]
        order = global_batches.view(self.batches_per_epoch, self.world_size, self.batch_size)[:, self.rank]
        return order.to(self.images.device, non_blocking=True) if self.on_device else order

    def next(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The next batch: float32 images [B, C, H, W] in [-1, 1] on the device, and their int64 labels [B] (None
        without labels)."""
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self.epoch_order(self.epoch), self.epoch
        rows = self._order[self.position]
        if self.on_device:
            batch = self.images[rows]  # on the GPU: a slice and a gather, no sync
        else:  # read in ascending order (a memory-mapped cache reads sequentially), then put in the batch's order
            ascending, places = rows.sort()
            batch = self.images[ascending][places.argsort()]
        labels = self.labels[rows] if self.labels is not None else None
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        if not self.on_device and self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
            labels = labels.pin_memory().to(self.device, non_blocking=True) if labels is not None else None
        # Converting on the device moves a quarter of the bytes a float batch would.
        return batch.float().div_(127.5).sub_(1), labels

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": int(self.epoch), "position": int(self.position), "batch_size": self.global_batch}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def load_state_dict(self, state: Dict[str, int]) -> None:
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise UserError(
                f"the checkpoint's data position {state!r} is not {{'epoch': int, 'position': int}}; the "
                "checkpoint is damaged"
            ) from None
        saved_batch = int(state.get("batch_size", self.global_batch))  # absent before batch sizes were saved
        position = position * saved_batch // self.global_batch  # the images seen into the epoch, in today's batches
        if position >= self.batches_per_epoch:
            # A smaller data set or a larger batch since the checkpoint: start the next epoch cleanly.
            log.warning(
                "the checkpoint was at batch %d of epoch %d, but an epoch now has %d batches; continuing at epoch %d",
                position,
                epoch,
                self.batches_per_epoch,
                epoch + 1,
            )
            epoch, position = epoch + 1, 0
        self.epoch, self.position = epoch, position


def _fits_on_gpu(images: torch.Tensor, device: torch.device) -> bool:
    free, _total = torch.cuda.mem_get_info(device)
    # Half of what is free leaves room for the networks, their activations and optimizer state.
    return images.numel() * images.element_size() < free // 2
