"""Sample quality, measured honestly: FID and KID through torch-fidelity (for `gan-eval` and gan-train's evaluator).

What is compared:
- the generated set: `n` images from a checkpoint's generator (EMA weights when present), image i from
  latent seed `seed + i`, so two evaluations of one checkpoint see the same images; or a folder of images.
- the reference set: `reference_n` images of a data set, a seeded random subset (all of it when
  reference_n=0); or a folder of images.

How: torch-fidelity's Inception-v3 ("inception-v3-compat", the 2015-12-05 TensorFlow graph of the
standard protocol) reads uint8 [3, H, W] images at their native size and resizes them to 299x299
itself, with TensorFlow 1's bilinear resize; grayscale images are given as three identical channels.
FID is the Fréchet distance between Gaussians fitted to the 2048-d pool features (biased: it grows as
fewer images are used, so compare FIDs only at equal counts); KID is the mean polynomial-kernel MMD^2
over random subsets (unbiased, so it compares across counts). Neither is implemented here.

The reference features are the slow part (Inception runs at ~15 images/s on two CPU cores), so
torch-fidelity caches them on disk under a name built from data set, split, image size, count, a hash
of the very images and a hash of the weights: the second evaluation against a data set skips them.
gan-eval shows a bar with an ETA for the features of each side, and on a CPU, when the rate measured on
the first batch means more than LONG_CPU_EVAL_S of work, it says how long first.

Every result is stamped with its protocol, printed as a table and written as JSON.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import logging
import math
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from dcgan import checkpoint, data, files
from dcgan.data import DatasetConfig
from dcgan.errors import UserError, at_least, at_most, check_seeds, check_writable_folder, one_of, unused
from dcgan.images import generate, latents, to_uint8
from dcgan.layout import RunFolder
from dcgan.log import duration

log = logging.getLogger(__name__)


@dataclass
class MetricsConfig:
    """How FID and KID are measured (through torch-fidelity): gan-eval's settings, and `eval.*` of gan-train."""

    n: int = 10000  # generated images; image i comes from latent seed `seed + i`
    reference_n: int = 10000  # real images: a seeded random subset of the data set (0 = all of it)
    metrics: List[str] = field(default_factory=lambda: ["fid", "kid"])
    inception_weights: Optional[str] = (
        None  # a local weights file (offline use); None = torch-fidelity downloads its own
    )
    batch_size: int = 64  # images per Inception forward pass
    kid_subsets: int = 100  # KID averages the MMD over this many random subsets...
    kid_subset_size: int = 1000  # ...of this many images each (capped at the smaller image count)
    seed: int = 0
    cache_dir: Optional[str] = None  # reference-feature cache; None = $XDG_CACHE_HOME (else ~/.cache)/dcgan/fidelity


METRICS = ("fid", "kid")


@dataclass
class TrainEvalConfig(MetricsConfig):
    """`eval.*` of gan-train: how trainer.eval_every* and sweep.objective=fid|kid measure."""

    # The reference: None = the training images (already in memory); a split of the data set (e.g. test) =
    # gan-eval's `dataset.split=SPLIT` protocol, so the scores compare with gan-eval's and across recipes.
    split: Optional[str] = None


def validate_eval_split(m: TrainEvalConfig | DictConfig, dataset: DatasetConfig | DictConfig) -> None:
    """eval.split names a split the training data set has."""
    splits = data.DATASETS[dataset.name].splits if dataset.name in data.DATASETS else ()
    if m.split is not None and m.split not in splits:
        have = f"its splits are {', '.join(splits)}" if splits else "it has none: leave eval.split unset"
        raise UserError(f"eval.split={m.split}: dataset {dataset.name} has no such split ({have})")


def reference_for_training(
    m: TrainEvalConfig | DictConfig, dataset: DatasetConfig | DictConfig, images: Optional[torch.Tensor] = None
) -> ImageSource:
    """The reference trainer.eval_every* and sweep.objective compare with: eval.split of the data set, or the
    training images (`images`, when already loaded)."""
    if m.split is None:
        return reference_from_dataset(dataset, m.reference_n, m.seed, images)
    other = OmegaConf.merge(dataset, {"split": m.split})
    return reference_from_dataset(other, m.reference_n, m.seed)


def validate_metrics(prefix: str, m: MetricsConfig | DictConfig) -> None:
    """FID/KID settings, shared by gan-eval (prefix "") and gan-train's eval section (prefix "eval.")."""
    if not m.metrics:
        raise UserError(f"{prefix}metrics is empty; ask for fid, kid or both, e.g. {prefix}metrics=[fid,kid]")
    for name in m.metrics:
        one_of(f"{prefix}metrics", name, METRICS)
    # FID needs a covariance and KID subsets of two or more images, from both sets.
    for key in ("n", "reference_n"):
        if m[key] < 2 and not (key == "reference_n" and m[key] == 0):
            raise UserError(
                f"{prefix}{key} must be at least 2 (FID needs a covariance, KID subsets of 2+ images), got "
                f"{m[key]}; use 1000 or more for a meaningful score"
            )
    at_least(f"{prefix}batch_size", m.batch_size, 1)
    at_least(f"{prefix}kid_subsets", m.kid_subsets, 1)
    at_least(f"{prefix}kid_subset_size", m.kid_subset_size, 2)
    check_metric_sizes(prefix, m)
    check_seeds(f"{prefix}seed", m.seed, m.seed + m.n - 1)  # generated image i comes from seed + i
    if m.cache_dir:  # written after the reference's features are measured: minutes of work lost if it can't be
        check_writable_folder(f"{prefix}cache_dir", Path(m.cache_dir).expanduser())
    if m.inception_weights and not Path(m.inception_weights).expanduser().is_file():
        raise UserError(
            f"{prefix}inception_weights={m.inception_weights} is not a file; point it at a torch-fidelity Inception "
            "weights "
            "file (e.g. inception-2015-12-05-fidelity.pth), or leave it unset to let torch-fidelity download its own "
            "copy"
        )


# Bounds on the sizes a typo can make huge. FID's published protocols use 10,000 or 50,000 images.
MAX_METRIC_IMAGES = 200_000
MAX_METRIC_BATCH = 4096
MAX_KID_SUBSETS = 10_000
# Inception's float32 activations per image in one forward pass, a lower bound (its 299x299 input alone is 1 MiB).
INCEPTION_BYTES_PER_IMAGE = 3 * 299 * 299 * 4


def check_metric_sizes(prefix: str, m: MetricsConfig | DictConfig) -> None:
    """Counts with a cost in time or memory are bounded; KID's settings are refused when KID is not measured."""
    for key in ("n", "reference_n"):
        at_most(
            f"{prefix}{key}",
            m[key],
            MAX_METRIC_IMAGES,
            "every image runs through Inception at 299x299 px (FID's usual protocols use 10,000 or 50,000)",
        )
    batch_gib = m.batch_size * INCEPTION_BYTES_PER_IMAGE / 2**30
    at_most(
        f"{prefix}batch_size",
        m.batch_size,
        MAX_METRIC_BATCH,
        f"one Inception pass over {m.batch_size:,} images needs more than {batch_gib:,.0f} GiB for its input alone",
    )
    at_most(f"{prefix}kid_subsets", m.kid_subsets, MAX_KID_SUBSETS, "KID's cost grows with each subset (default 100)")
    if "kid" not in m.metrics:
        defaults = MetricsConfig()
        for key in ("kid_subsets", "kid_subset_size"):
            if m[key] != getattr(defaults, key):
                unused(f"{prefix}{key}", m[key], "KID is not measured", f"add kid: {prefix}metrics=[fid,kid]")


def require_inception_weights(
    m: MetricsConfig | DictConfig, needed_by: str = "trainer.eval_every", instead: str = "trainer.eval_every=0"
) -> None:
    """No Inception weights on this machine for what gan-train will measure (`needed_by`) is found now, not
    after training; `instead` is the setting that needs none."""
    if m.inception_weights:  # validate_metrics proved it is a file
        return
    cached = downloaded_weights()
    if not cached.is_file():
        raise UserError(
            f"{needed_by} needs torch-fidelity's Inception weights, which are not here (no eval.inception_weights, "
            f"no download at {cached}); set eval.inception_weights=PATH to a local copy, or run once with internet "
            f"(e.g. gan-eval) so torch-fidelity downloads them, or set {instead}"
        )


FEATURE_EXTRACTOR = "inception-v3-compat"
# The same torch-fidelity network and weights, registered under our name to run channels-last:
# ~1.5x faster on CPU, features equal to ~1e-6 (the order of float additions changes, nothing else).
CHANNELS_LAST_EXTRACTOR = "inception-v3-compat-channels-last"
FEATURE_LAYER = "2048"
GENERATE_CHUNK = 1000  # latents drawn and images kept as uint8 per chunk, so n=50000 needs little memory
LONG_CPU_EVAL_S = 120  # on a CPU, an evaluation expected to take longer is announced with its duration


# ---------------------------------------------------------------- image sets


class ImageSet(Dataset):
    """uint8 images [N, C, H, W] (C = 1 or 3), served as torch-fidelity wants them: uint8 [3, H, W].

    `reads` counts the images handed out: zero after an evaluation means the features came from the cache.
    """

    def __init__(self, images: torch.Tensor):
        self.images = images
        self.reads = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        self.reads += 1
        image = self.images[index]
        return image.expand(3, -1, -1) if image.shape[0] == 1 else image


class FolderImages(Dataset):
    """The images of a folder (searched recursively), decoded one at a time as uint8 RGB [3, H, W].

    They are fed at their native size, so they must all have one size; `limit` > 0 keeps a seeded random subset.
    """

    def __init__(self, folder: Path, limit: int, seed: int):
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder; pass a folder of images (png, jpg, ...)")
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in data.IMAGE_EXTENSIONS and p.is_file())
        if not found:
            raise UserError(
                f"no images in {folder} (looked for {', '.join(data.IMAGE_EXTENSIONS)}, recursively); "
                "point it at a folder of images"
            )
        self.selection = "all images" if not 0 < limit < len(found) else f"random subset of {len(found)}, seed {seed}"
        self.files = [found[i] for i in seeded_subset(len(found), limit, seed).tolist()]
        self.reads = 0
        sizes, modes = {}, set()
        for path in self.files:
            try:
                with Image.open(path) as image:
                    sizes.setdefault(image.size, path)
                    modes.add(image.mode)
                    image.verify()  # a truncated or corrupt PNG fails here, not minutes into the evaluation
            except Exception as error:  # Pillow fails in many ways on a bad file
                raise unreadable(path, error) from None
        if len(sizes) > 1:
            (size_a, path_a), (size_b, path_b) = list(sizes.items())[:2]
            raise UserError(
                f"images in {folder} have different sizes ({path_a.name} is {size_a[0]}x{size_a[1]}, {path_b.name} is "
                f"{size_b[0]}x{size_b[1]}); FID reads them at their native size, so resize them to one size first"
            )
        self.width, self.height = next(iter(sizes))
        self.channels = 1 if modes <= {"L", "1", "I", "I;16", "LA"} else 3

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        self.reads += 1
        path = self.files[index]
        try:
            with Image.open(path) as image:
                return pil_to_tensor(image.convert("RGB"))  # grayscale -> three identical channels
        except Exception as error:  # what verify() cannot see, e.g. a JPEG cut short
            raise unreadable(path, error) from None

    def fingerprint(self) -> str:
        """Changes when any file is renamed, resized or rewritten."""
        digest = hashlib.sha1()
        for path in self.files:
            stat = path.stat()
            digest.update(
                f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape")
            )  # names need not be UTF-8
        return digest.hexdigest()


def unreadable(path: Path, error: Exception) -> UserError:
    return UserError(
        f"cannot read image {data.printable(str(path))} ({type(error).__name__}: {error}); delete or fix it"
    )


@dataclass
class ImageSource:
    """One side of a comparison: the images, what they are (for the stamp), and a cache name when cacheable."""

    images: Dataset
    stamp: Dict[str, Any]
    cache_key: Optional[str] = None  # None: never cached (generated images differ every time)


def seeded_subset(count: int, n: int, seed: int) -> torch.Tensor:
    """Indices of `n` of `count` items, a pure function of the seed; all of them when n is 0 or too big."""
    if n <= 0 or n >= count:
        return torch.arange(count)
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def reference_from_dataset(
    cfg: DatasetConfig | DictConfig, n: int, seed: int, images: Optional[torch.Tensor] = None
) -> ImageSource:
    """`n` images of the data set (all when n=0), keyed for the cache by what they are and by their bytes."""
    images = data.load_images(cfg) if images is None else images
    picked = images[seeded_subset(len(images), n, seed)]
    split = data.split_of(cfg) or "all"
    content = hashlib.sha1(picked.numpy().tobytes()).hexdigest()
    key = f"{cfg.name}-{split}-{cfg.image_size}px-{cfg.channels}ch-n{len(picked)}-{content[:12]}"
    stamp = {
        "source": f"data set {cfg.name}",
        "root": str(cfg.root),
        "split": split,
        "count": len(picked),
        "selection": "all images" if len(picked) == len(images) else f"random subset of {len(images)}, seed {seed}",
        "image_size": int(cfg.image_size),
        "channels": int(cfg.channels),
    }
    return ImageSource(ImageSet(picked), stamp, key)


def reference_from_folder(folder: Path, n: int, seed: int) -> ImageSource:
    images = FolderImages(folder, n, seed)
    safe_name = re.sub(r"[^A-Za-z0-9_.-]", "_", folder.resolve().name)[:40]
    key = f"folder-{safe_name}-n{len(images)}-{images.fingerprint()[:12]}"
    return ImageSource(images, folder_stamp(folder, images), key)


def folder_stamp(folder: Path, images: FolderImages) -> Dict[str, Any]:
    return {
        "source": f"folder {folder}",
        "split": "all",
        "count": len(images),
        "selection": images.selection,
        "image_size": images.height if images.height == images.width else f"{images.width}x{images.height}",
        "channels": images.channels,
    }


def generated_from_model(
    G: nn.Module, z_dim: int, distribution: str, n: int, seed: int, device: torch.device
) -> torch.Tensor:
    """`n` uint8 images from G (eval mode), image i from latent seed `seed + i`."""
    chunks = []
    for start in range(seed, seed + n, GENERATE_CHUNK):
        z = latents(list(range(start, min(start + GENERATE_CHUNK, seed + n))), z_dim, distribution, device)
        chunks.append(to_uint8(generate(G, z)))
    return torch.cat(chunks)


# ---------------------------------------------------------------- Inception weights


@dataclass(frozen=True)
class Weights:
    path: Optional[str]  # a local file, or None for torch-fidelity's own download
    cache_key: str  # names the weights in reference-cache entries

    def sha256(self) -> str:
        """The file's hash; for the download, of torch hub's copy (present once torch-fidelity has run)."""
        path = Path(self.path) if self.path else downloaded_weights()
        return file_sha256(str(path), *_stat(path)) if path.is_file() else "unknown (not downloaded yet)"


def resolve_weights(path: Optional[str]) -> Weights:
    if not path:
        # The URL's file name carries the first hex digits of its sha256.
        return Weights(None, "tf-" + Path(default_weights_url()).stem.split("-")[-1])
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise UserError(
            f"Inception weights {path} is not a file; point inception_weights at one, or leave it unset to "
            "let torch-fidelity download its own copy"
        )
    return Weights(str(resolved), file_sha256(str(resolved), *_stat(resolved))[:12])


def default_weights_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def downloaded_weights() -> Path:
    """Where torch-fidelity's own download of the weights lives (torch hub's checkpoint folder), once it has run."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(default_weights_url()).name


def _stat(path: Path) -> tuple:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@lru_cache(maxsize=8)
def file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, remembered per (path, size, mtime): hashing 95 MB of weights takes a few tenths of a second."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def register_extractor() -> None:
    """Register torch-fidelity's Inception under CHANNELS_LAST_EXTRACTOR (once per process)."""
    import torch_fidelity
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if CHANNELS_LAST_EXTRACTOR in FEATURE_EXTRACTORS_REGISTRY:
        return

    class ChannelsLastInception(FeatureExtractorInceptionV3):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            try:
                super().__init__(
                    name, features_list, feature_extractor_weights_path=feature_extractor_weights_path, **kwargs
                )
            except Exception as error:  # a download with no internet, or a file that is not these weights
                reason = " ".join(str(error).split())[:200]
                if feature_extractor_weights_path is None:
                    raise UserError(
                        f"could not download torch-fidelity's Inception weights ({reason}); with no internet, "
                        "pass a local copy: inception_weights=PATH (eval.inception_weights=PATH in gan-train)"
                    ) from None
                raise UserError(
                    f"{feature_extractor_weights_path} is not torch-fidelity Inception-v3 weights "
                    f"({reason}); use inception-2015-12-05 weights in its format"
                ) from None
            self.to(memory_format=torch.channels_last)

    torch_fidelity.register_feature_extractor(CHANNELS_LAST_EXTRACTOR, ChannelsLastInception)


# ---------------------------------------------------------------- measuring


def measure(
    generated: ImageSource,
    reference: ImageSource,
    settings: MetricsConfig | DictConfig,
    device: torch.device,
    show_progress: bool = False,
) -> List[Dict[str, Any]]:
    """FID and/or KID between the two sets, one stamped result per metric; `show_progress`: bars and an ETA."""
    return measure_with_features(generated, reference, settings, device, show_progress)[0]


@dataclass
class Features:
    """Each side's FEATURE_LAYER features, row i from image i, kept so other scores (intra-class FID) reuse them."""

    generated: torch.Tensor  # float32 [N, 2048], on the CPU
    reference: torch.Tensor
    weights: Weights
    protocol: Dict[str, Any]  # measurement_protocol of the extraction
    seconds: float  # spent extracting and scoring


def measure_with_features(
    generated: ImageSource,
    reference: ImageSource,
    settings: MetricsConfig | DictConfig,
    device: torch.device,
    show_progress: bool = False,
) -> Tuple[List[Dict[str, Any]], Features]:
    """`measure`'s results, and the features they were computed from."""
    register_extractor()
    weights = resolve_weights(settings.inception_weights)
    count_1, count_2 = len(generated.images), len(reference.images)
    if min(count_1, count_2) < 2:
        raise UserError(
            f"FID and KID need at least 2 images on each side; got {count_1} generated and {count_2} reference images"
        )
    kid_subset_size = min(settings.kid_subset_size, count_1, count_2)
    cache_name = f"{reference.cache_key}-w{weights.cache_key}" if reference.cache_key else None
    cache_dir = Path(settings.cache_dir).expanduser() if settings.cache_dir else data.user_cache_dir() / "fidelity"
    reads_before = reference.images.reads
    started = time.perf_counter()
    if show_progress:
        generated, reference = with_progress(generated, reference, settings.batch_size, device, cache_dir, cache_name)
    features_1, features_2 = fidelity_features(generated, reference, settings, device, weights, cache_dir, cache_name)
    scores = scores_from_features(features_1, features_2, settings.metrics, settings.kid_subsets, kid_subset_size)
    seconds = time.perf_counter() - started
    cached = reference.images.reads == reads_before and cache_name is not None  # no image read: the cache served all
    protocol = measurement_protocol(weights, cached, cache_dir / cache_name if cache_name else None)
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    results = []
    for metric in settings.metrics:
        value, spread, extra = read_score(
            metric, scores, settings.kid_subsets, kid_subset_size, whole_sets=count_1 == count_2 == kid_subset_size
        )
        results.append(
            {
                "metric": metric,
                "value": value,
                "std": spread,
                "generated": generated.stamp,
                "reference": reference.stamp,
                "protocol": {**protocol, **extra},
                "device": str(device),
                "seconds": round(seconds, 1),
                "date": when,
            }
        )
    return results, Features(features_1, features_2, weights, protocol, seconds)


def with_progress(
    generated: ImageSource,
    reference: ImageSource,
    batch_size: int,
    device: torch.device,
    cache_dir: Path,
    cache_name: Optional[str],
) -> Tuple[ImageSource, ImageSource]:
    """Both sides with a bar over their feature extraction, and on a CPU a duration warning after the first batch."""
    cached = cache_name is not None and any(cache_dir.glob(glob.escape(cache_name) + "-*"))
    to_extract = len(generated.images) + (0 if cached else len(reference.images))

    def warn_if_long(images_per_s: float) -> None:
        from tqdm import tqdm

        seconds = (to_extract - batch_size) / images_per_s
        if device.type == "cpu" and seconds > LONG_CPU_EVAL_S:
            with tqdm.external_write_mode(file=sys.stderr):  # on a line of its own, not after the drawn bar
                log.warning(
                    "this takes about %s on the CPU: %d images through Inception at %.1f images/s (measured on the "
                    "first batch)%s; lower n and reference_n for a quicker, noisier score, or use a GPU",
                    duration(seconds),
                    to_extract,
                    images_per_s,
                    "" if cached else ", reference features included (cached for next time)",
                )

    return (
        replace(generated, images=FeatureProgress(generated.images, "generated", batch_size, warn_if_long)),
        replace(reference, images=FeatureProgress(reference.images, "reference", batch_size)),
    )


class FeatureProgress(Dataset):
    """A side's images as torch-fidelity reads them (in order, batch by batch), counted by a bar with an ETA.

    The bar appears at the first read, so a side whose features come from the cache shows none. After the
    first batch, `on_first_batch` gets the measured rate in images/s.
    """

    def __init__(
        self, images: Dataset, side: str, batch_size: int, on_first_batch: Optional[Callable[[float], None]] = None
    ):
        self.images, self.side, self.batch_size, self.on_first_batch = images, side, batch_size, on_first_batch
        self.bar: Optional[Any] = None
        self.started = 0.0

    def __len__(self) -> int:
        return len(self.images)

    @property
    def reads(self) -> int:
        return self.images.reads

    def __getitem__(self, index: int) -> torch.Tensor:
        from tqdm import tqdm

        if self.bar is None:
            # Into a file or a pipe, a line a minute at most: a redrawn bar would fill the log.
            interval = 0.5 if sys.stderr.isatty() else 60
            self.bar = tqdm(
                total=len(self), desc=f"Inception features, {self.side}", unit="image", mininterval=interval
            )
            self.started = time.perf_counter()
        if index == self.batch_size and self.on_first_batch is not None:
            self.on_first_batch(self.batch_size / max(time.perf_counter() - self.started, 1e-9))
        self.bar.update(1)
        if self.bar.n == len(self):
            self.bar.close()
        return self.images[index]


def fidelity_features(
    generated: ImageSource,
    reference: ImageSource,
    settings: MetricsConfig | DictConfig,
    device: torch.device,
    weights: Weights,
    cache_dir: Path,
    cache_name: Optional[str],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both sides' features through torch-fidelity's own extraction (generated first, then reference), the
    reference side's cached under `cache_name` (None: not cached), as torch-fidelity's calculate_metrics does."""
    from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id_cached

    cuda = device.type == "cuda"
    options = {
        "input1": generated.images,
        "input2": reference.images,
        "input2_cache_name": cache_name,
        "cache": cache_name is not None,
        "cache_root": str(cache_dir),
        "batch_size": settings.batch_size,
        "cuda": cuda,
        "save_cpu_ram": True,  # no DataLoader worker processes: the images are in memory already
        "verbose": False,
        "feature_extractor_weights_path": weights.path,
    }
    with torch.cuda.device(device) if cuda else nullcontext(), cache_write_errors(cache_dir, cache_name):
        extractor = create_feature_extractor(CHANNELS_LAST_EXTRACTOR, [FEATURE_LAYER], **options)
        generated_features, reference_features = (
            extract_featuresdict_from_input_id_cached(side, extractor, **options)[FEATURE_LAYER] for side in (1, 2)
        )
    return generated_features.cpu(), reference_features.cpu()


def scores_from_features(
    features_1: torch.Tensor, features_2: torch.Tensor, metrics: List[str], kid_subsets: int, kid_subset_size: int
) -> Dict[str, float]:
    """torch-fidelity's FID and/or KID of two feature sets, under torch-fidelity's own result keys."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    scores = {}
    if "fid" in metrics:
        scores["frechet_inception_distance"] = frechet_distance(features_1, features_2)
    if "kid" in metrics:
        scores.update(
            kid_features_to_metric(
                features_1, features_2, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, verbose=False
            )
        )
    return scores


def frechet_distance(features_1: torch.Tensor, features_2: torch.Tensor) -> float:
    """FID of two feature sets [N, D], by torch-fidelity: the Gaussians' mean and covariance, then the distance.
    Its cost is an eigenvalue problem of D x D (about 10 s for D = 2048 on two CPU cores), whatever N is."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    statistics = [fid_features_to_statistics(features) for features in (features_1, features_2)]
    return float(fid_statistics_to_metric(*statistics, verbose=False)["frechet_inception_distance"])


@contextmanager
def cache_write_errors(cache_dir: Path, cache_name: Optional[str]) -> Iterator[None]:
    """torch-fidelity saving reference features on a full disk: one line naming the cache, not a traceback.

    torch.save reports a failed write as a RuntimeError from its zip writer, told apart here by its
    source file; any other RuntimeError is a bug and keeps its traceback. torch-fidelity removes its
    temporary file itself.
    """
    try:
        yield
    except (OSError, RuntimeError) as error:
        written = str(getattr(error, "filename", None) or cache_dir).startswith(str(cache_dir))
        if cache_name is None or not written or not (isinstance(error, OSError) or "inline_container" in str(error)):
            raise
        reason = error.strerror if isinstance(error, OSError) and error.strerror else "the write was cut short"
        raise files.not_written(
            cache_dir / cache_name,
            reason,
            "free some disk space, or set cache_dir= to a folder on another disk",
            what="the reference-feature cache ",
        ) from None


def measurement_protocol(weights: Weights, cached: bool, cache: Optional[Path]) -> Dict[str, Any]:
    """What every result is stamped with: extractor, resize, weights and their hash, library versions, cache use."""
    import torch_fidelity

    return {
        "feature_extractor": (
            f"{FEATURE_EXTRACTOR} (torch-fidelity; run channels-last), {FEATURE_LAYER}-d pool features"
        ),
        "resize": "native size in; bilinear (TensorFlow 1 compatible) to 299x299 inside the extractor",
        "grayscale": "three identical channels",
        "weights_file": weights.path or f"torch-fidelity download {default_weights_url()}",
        "weights_sha256": weights.sha256(),  # after the run: torch-fidelity's own download is there by then
        "library": f"torch-fidelity {torch_fidelity.__version__}",
        "torch": torch.__version__,
        "reference_features": "cached" if cached else "computed",
        "cache": str(cache) if cache else None,
    }


def read_score(
    metric: str, scores: Dict[str, float], kid_subsets: int, kid_subset_size: int, whole_sets: bool = False
) -> Tuple[float, Optional[float], Dict[str, int]]:
    """(value, spread or None, the metric's own protocol fields) of one metric in torch-fidelity's scores;
    `whole_sets`: KID's subsets were both image sets whole (as many images on each side as the subset size)."""
    if metric == "fid":
        return float(scores["frechet_inception_distance"]), None, {}
    extra = {"kid_subsets": int(kid_subsets), "kid_subset_size": int(kid_subset_size)}
    spread: Optional[float] = float(scores["kernel_inception_distance_std"])
    if whole_sets:  # every subset held every image: the same MMD each time, so its std of 0 measures nothing
        spread, extra["kid_subsets"] = None, 1
    return float(scores["kernel_inception_distance_mean"]), spread, extra


# ---------------------------------------------------------------- during training


class TrainingEvaluator:
    """gan-train's `trainer.eval_every*`: FID/KID of the sampling generator against eval.split (default: the
    training images), each result stamped beside the step's checkpoint (checkpoints/step_N.eval.json, as gan-eval
    names it), and `checkpoints/best.pt` kept by FID (by KID when FID is not measured), with its stamp in
    RunFolder.best_stamp."""

    def __init__(self, cfg: DictConfig, images: torch.Tensor, device: torch.device, run: RunFolder, resumed: bool):
        self.settings, self.generator_cfg = cfg.eval, cfg.generator
        self.weights_name = (
            "ema" if cfg.trainer.ema > 0 else "generator"
        )  # what TrainingState.sampling_generator returns
        self.device, self.run = device, run
        # A seeded subset of eval.split, or of the training images (in memory already).
        self.reference = reference_for_training(cfg.eval, cfg.dataset, images)
        self.best_by = "fid" if "fid" in cfg.eval.metrics else "kid"
        self.best = read_best_score(run.best_stamp, self.best_by) if resumed else math.inf

    def __call__(self, step: int, G: nn.Module, training_state: Callable[[], Dict[str, Any]]) -> Dict[str, float]:
        """Scores for the metrics row; writes best.pt (from `training_state()`) when this is the best so far."""
        s = self.settings
        images = generated_from_model(
            G, self.generator_cfg.z_dim, self.generator_cfg.z_distribution, s.n, s.seed, self.device
        )
        stamp = {
            "source": "training",
            "weights": self.weights_name,
            "step": step,
            "count": len(images),
            "selection": f"latent seeds {s.seed}..{s.seed + s.n - 1}",
            "image_size": int(images.shape[-1]),
            "channels": int(images.shape[1]),
        }
        results = measure(ImageSource(ImageSet(images), stamp), self.reference, s, self.device)
        scores = {r["metric"]: round(r["value"], 6) for r in results}
        scores["eval_s"] = results[0]["seconds"]
        stamp_path = self.run.checkpoints / checkpoint.step_name(step)
        self.run.checkpoints.mkdir(parents=True, exist_ok=True)
        files.atomic_write_text(stamp_path.with_suffix(".eval.json"), json.dumps({"results": results}, indent=2) + "\n")
        if scores[self.best_by] < self.best:
            self.best = scores[self.best_by]
            checkpoint.save_as(training_state(), self.run.checkpoints / checkpoint.BEST)
            kept_for = {"step": step, "best_by": self.best_by, "results": results}
            files.atomic_write_text(self.run.best_stamp, json.dumps(kept_for, indent=2) + "\n")
        return scores


def read_best_score(path: Path, metric: str) -> float:
    """The score best.pt was kept for (`path`: RunFolder.best_stamp), so a resumed run only replaces it with a better
    one."""
    try:
        results = json.loads(path.read_text())["results"]
        return next(float(r["value"]) for r in results if r["metric"] == metric)
    except (OSError, ValueError, KeyError, StopIteration):
        return math.inf
