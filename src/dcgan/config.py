"""Typed configuration: the dataclass schemas behind every Hydra config group, and their checks.

The YAML files in `configs/` fill these schemas, so a misspelt key or a wrong type fails when the
config is composed; `validate()` then holds the checks that a type cannot express (a batch size of 0,
an image size the architecture cannot make). Every user-facing problem is raised as `UserError`,
which the command-line entry points turn into one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint): reported without a traceback."""


def config_dir() -> Path:
    """The `configs/` tree: inside the installed package, or at the top of a source checkout.

    Hydra resolves a relative `config_path` through the Python package when it runs as a console
    script, which misses a top-level folder (hydra issue #2125), so we hand it an absolute path.
    """
    packaged = Path(__file__).resolve().parent / "configs"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "configs"
    if checkout.is_dir():
        return checkout
    raise UserError(f"the configs/ folder is missing (looked in {packaged} and {checkout}); reinstall the package")


@dataclass
class DatasetConfig:
    name: str = "mnist_tiny"  # mnist | fashion_mnist | celeba | folder | mnist_tiny
    root: str = "data"  # where the data set lives (or is downloaded to)
    image_size: int = 28  # square side in pixels, after crop and resize
    channels: int = 1  # 1 (grayscale) or 3 (RGB); images are converted to this
    split: str = "train"  # train | test (mnist, fashion_mnist); celeba: train | valid | test | all
    download: bool = True  # try torchvision's downloader when the files are missing
    crop: int = 0  # side of the centered square cropped before resizing; 0 = the largest square
    max_images: int = 0  # use only the first N images (0 = all)
    on_bad_file: str = "skip"  # folder/celeba: skip unreadable images with a warning, or error
    cache_dir: Optional[str] = None  # decoded-image cache; None = beside the data (or $XDG_CACHE_HOME, else ~/.cache)
    num_workers: int = 0  # processes for the one-time JPEG decode; 0 = one per core


@dataclass
class GeneratorConfig:
    arch: str = "dcgan"  # a name in models.GENERATORS
    z_dim: int = 100  # length of the latent vector
    z_distribution: str = "normal"  # normal (N(0,1)) | uniform (U(-1,1))
    width: float = 1.0  # multiplies every hidden layer's channel count (1.0 = the published model)
    dropout: float = 0.0  # used by architectures that have dropout layers
    init: str = "dcgan"  # dcgan: N(0, 0.02) weights, BN N(1, 0.02) | default: PyTorch's own


@dataclass
class DiscriminatorConfig:
    arch: str = "dcgan"  # a name in models.DISCRIMINATORS
    width: float = 1.0
    dropout: float = 0.0
    norm: str = "batch"  # batch | none: normalization of the hidden conv layers
    init: str = "dcgan"
    spectral_norm: bool = False  # divide every conv/linear weight by its largest singular value (Miyato et al. 2018)


@dataclass
class LossConfig:
    name: str = "ns"  # ns (non-saturating BCE) | hinge | lsgan | wgan_gp
    real_label: float = 1.0  # target for real images; 0.9 is one-sided label smoothing (ns, lsgan)
    gp_weight: float = 10.0  # gradient-penalty weight (wgan_gp)
    r1_weight: float = 0.0  # R1 penalty gamma on real images, gamma/2 * |grad D(x)|^2 (Mescheder et al. 2018); 0 = off


@dataclass
class AugmentConfig:
    # DiffAugment (Zhao et al. 2020): the same random, differentiable transforms applied to every image D
    # sees, real and fake, in both D and G updates. Any of color, translation, cutout; [] = off.
    # e.g. augment.policy=[color,translation,cutout]
    policy: List[str] = field(default_factory=list)


@dataclass
class OptimizerSettings:
    name: str = "Adam"  # any class in torch.optim
    lr: float = 2e-4
    betas: List[float] = field(default_factory=lambda: [0.5, 0.999])  # for optimizers that take betas
    weight_decay: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)  # further keyword arguments, e.g. {momentum: 0.9}


@dataclass
class OptimizerConfig:
    generator: OptimizerSettings = field(default_factory=OptimizerSettings)
    discriminator: OptimizerSettings = field(default_factory=OptimizerSettings)


@dataclass
class HealthConfig:
    """The health guard's thresholds (health.py); the defaults never trip on a run that is learning."""

    collapse_steps: int = 1000  # a collapse signature must hold this many steps to count; 0 = watch NaN/Inf only
    collapse_d_accuracy: float = 0.99  # collapse: D's accuracy at or above this ...
    collapse_loss_g: float = 10.0  # ... while G's loss is at or above this (ns loss: D(G(z)) < 5e-5)
    min_diversity: float = 0.05  # or the fixed-noise grid varies less than this fraction of real images
    max_rollbacks: int = 3  # on_divergence=rollback: stop after this many rollbacks
    rollback_lr_factor: float = 0.5  # the k-th rollback trains on with both learning rates x factor**k


@dataclass
class TrainerConfig:
    batch_size: int = 128  # real images per D update (and fakes per G update)
    max_steps: int = 0  # generator updates to run; 0 = run `epochs` epochs
    epochs: int = 5  # passes over the data set (counted in D's real batches), when max_steps = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    d_steps: int = 1  # discriminator updates per generator update
    sample_every: int = 500  # steps between fixed-noise grids in samples/
    ckpt_every: int = 1000  # steps between step_NNNNNN.pt checkpoints (last.pt is written with them)
    log_every: int = 50  # steps between metrics.jsonl rows (the only GPU syncs of the loop)
    resume: Optional[str] = None  # a checkpoint path, or "auto" for checkpoints/last.pt of the run dir
    overwrite: bool = False  # start over in a run dir that holds a run: its files move to RUN_DIR/replaced/<time>/
    amp: bool = False  # bf16 autocast (CUDA; also allowed on CPU)
    # Speed options (speed.py; measured in docs/PERFORMANCE.md): the same maths on other layouts and kernels.
    channels_last: bool = True  # NHWC layout for G and D
    compile: bool = False  # torch.compile G and D; a failure in the trial step before training falls back to eager
    cuda_graphs: bool = False  # CUDA only: compile in reduce-overhead mode (CUDA graphs of G's and D's passes); unmeasured
    fused_optimizer: bool = True  # fused kernels for Adam/AdamW/SGD/Adagrad (CUDA and CPU); other optimizers ignore it
    cudnn_benchmark: bool = True  # CUDA: cuDNN picks the fastest conv algorithm for our fixed shapes
    ema: float = 0.999  # decay of the generator's moving average; 0 turns it off
    keep_last: int = 3  # step checkpoints kept (0 = keep all); last.pt and the newest healthy one are always kept
    on_divergence: str = "stop"  # stop | rollback: what NaN/Inf or a collapse does (health.py; thresholds in `health`)
    health: HealthConfig = field(default_factory=HealthConfig)
    deterministic: bool = False  # PyTorch's deterministic algorithms (a warning where an op has none)
    grid_size: int = 64  # images in each progress grid
    progress: bool = True  # tqdm progress bar
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over the global batch (CUDA only)
    dist_timeout_s: float = 1800.0  # under torchrun: a collective waiting longer than this ends the job
    eval_every: int = 0  # steps between FID/KID evaluations of the sampling generator (see `eval`); 0 = never


@dataclass
class MetricsConfig:
    """How FID and KID are measured (through torch-fidelity): gan-eval's settings, and `eval.*` of gan-train."""

    n: int = 10000  # generated images; image i comes from latent seed `seed + i`
    reference_n: int = 10000  # real images: a seeded random subset of the data set (0 = all of it)
    metrics: List[str] = field(default_factory=lambda: ["fid", "kid"])
    inception_weights: Optional[str] = None  # a local weights file (offline use); None = torch-fidelity downloads its own
    batch_size: int = 64  # images per Inception forward pass
    kid_subsets: int = 100  # KID averages the MMD over this many random subsets...
    kid_subset_size: int = 1000  # ...of this many images each (capped at the smaller image count)
    seed: int = 0
    cache_dir: Optional[str] = None  # reference-feature cache; None = $XDG_CACHE_HOME (else ~/.cache)/dcgan/fidelity


@dataclass
class EvalConfig(MetricsConfig):
    ckpt: Optional[str] = None  # the checkpoint whose generator makes the `n` images (EMA weights when present)
    input1: Optional[str] = None  # or: a folder of images made by any tool
    input2: Optional[str] = None  # a folder of reference images, instead of a data set
    dataset: Optional[DatasetConfig] = None  # the reference data set (dataset=NAME); None = the checkpoint's training set
    ema: bool = True  # use the EMA generator when the checkpoint has one
    device: str = "auto"
    out: Optional[str] = None  # results JSON; None = beside the checkpoint (last.pt -> last.eval.json) or input1's folder


@dataclass
class TrainConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # FID/KID during training (trainer.eval_every): fewer images than gan-eval's 10,000, for speed.
    eval: MetricsConfig = field(default_factory=lambda: MetricsConfig(n=2000))
    # Where metrics go: jsonl (metrics.jsonl, always) plus optional trackers, e.g. logger=[jsonl,tensorboard].
    logger: List[str] = field(default_factory=lambda: ["jsonl"])


@dataclass
class SampleConfig:
    ckpt: str = ""  # the checkpoint to sample from (required)
    mode: str = "grid"  # grid | seeds | interpolate | neighbors | export
    n: int = 64  # images in the grid
    nrow: int = 8  # images per grid row
    seed: int = 0  # first seed: image i of the grid comes from seed + i
    seeds: str = ""  # mode=seeds, neighbors: e.g. "0-15" or "3,7,42"; mode=interpolate: the key seeds to pass through
    frames: int = 16  # mode=interpolate: frames between two key seeds
    fps: int = 12  # mode=interpolate: GIF frame rate
    # File (grid, interpolate: .gif = movie, .png = grid with a row per leg; neighbors; export) or folder (seeds);
    # "" = grid.png, seeds/, interpolation.gif, neighbors.png, generator.pt (torchscript) or generator.onnx.
    out: str = ""
    device: str = "auto"
    ema: bool = True  # use the EMA generator when the checkpoint has one
    truncation: Optional[float] = None  # truncation trick: normal latents redrawn beyond +-t; uniform scaled by t
    k: int = 5  # mode=neighbors: nearest training images shown beside each sample
    dataset_root: Optional[str] = None  # mode=neighbors: the training data, if not at the checkpoint's dataset.root
    format: str = "torchscript"  # mode=export: torchscript | onnx


@dataclass
class ReportConfig:
    run: str = ""  # a gan-train run folder (required): reads metrics.jsonl and samples/, writes the figures there
    fps: int = 4  # progress movie frame rate
    max_frames: int = 100  # progress movie: at most this many grids, evenly spaced (the first and last kept)


def _register() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="sample_schema", node=SampleConfig)
    store.store(name="eval_schema", node=EvalConfig)
    store.store(name="report_schema", node=ReportConfig)


_register()

DATASETS = ("mnist", "fashion_mnist", "celeba", "folder", "mnist_tiny")
LOSSES = ("ns", "hinge", "lsgan", "wgan_gp")
METRICS = ("fid", "kid")
LOGGERS = ("jsonl", "tensorboard")
DEVICES_HELP = "auto, cpu, cuda or cuda:N"


def compose(config_name: str, overrides: List[str]) -> DictConfig:
    """Compose `configs/<config_name>.yaml` with command-line style overrides, as Hydra would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    # Keep only config overrides; Hydra's own settings (hydra.run.dir=...) don't change the config.
    config_overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra.") and not o.startswith("-")]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=config_overrides)
    except UserError:
        raise
    except Exception as error:  # Hydra and OmegaConf report bad overrides with their own exception types
        raise UserError(describe_config_error(error)) from None
    finally:
        GlobalHydra.instance().clear()


def exit_with_help(usage: str, about: str, config_name: str, args: List[str]) -> None:
    """On --help or -h: how to call the command, what it does, and every setting with its default; exit 0."""
    if not any(arg in ("--help", "-h") for arg in args):
        return
    print(f"usage: {usage.strip().replace('`', '').rstrip('.')}\n\n{about.strip()}\n")
    print("Settings, given as KEY=VALUE (defaults shown; each is explained in dcgan/config.py):\n")
    print(to_yaml(compose(config_name, [])))
    sys.exit(0)


def describe_config_error(error: Exception) -> str:
    """One readable sentence from a Hydra/OmegaConf composition error, with what to do about it."""
    messages = []
    while error is not None:
        text = " ".join(str(error).split())
        messages.append(text.split(" Config search path")[0].split(" full_key:")[0])
        error = error.__cause__ or error.__context__
    # Outer first; OmegaConf repeats itself with "$VALUE" templates further down the chain.
    message = ": ".join(list(dict.fromkeys(m for m in messages if m and "$VALUE" not in m))[:2])
    if "Could not override" in message or "not in" in message:
        key = message.split("'")[1] if "'" in message else "?"
        return f"unknown config key {key}: check its spelling; the valid keys are in configs/ and src/dcgan/config.py"
    if "Could not find" in message:
        return f"{message.replace('In ' + repr('train') + ': ', '')}; pick one of those"
    return f"bad configuration: {message}"


def validate_train(cfg: TrainConfig | DictConfig) -> None:
    """Checks that span fields or need more than a type; raises UserError naming key and fix."""
    t = cfg.trainer
    validate_dataset(cfg.dataset)
    _at_least("generator.z_dim", cfg.generator.z_dim, 1)
    _one_of("generator.z_distribution", cfg.generator.z_distribution, ("normal", "uniform"))
    for part in ("generator", "discriminator"):
        section = cfg[part]
        if not section.width > 0:
            raise UserError(f"{part}.width must be > 0, got {section.width}")
        if not 0.0 <= section.dropout < 1.0:
            raise UserError(f"{part}.dropout must be in [0, 1), got {section.dropout}")
        _one_of(f"{part}.init", section.init, ("dcgan", "default"))
    _one_of("discriminator.norm", cfg.discriminator.norm, ("batch", "none"))
    _one_of("loss.name", cfg.loss.name, LOSSES)
    if not 0.0 < cfg.loss.real_label <= 1.0:
        raise UserError(f"loss.real_label must be in (0, 1], got {cfg.loss.real_label}")
    if cfg.loss.gp_weight < 0:
        raise UserError(f"loss.gp_weight must be >= 0, got {cfg.loss.gp_weight}")
    if cfg.loss.r1_weight < 0:
        raise UserError(f"loss.r1_weight must be >= 0 (0 turns R1 off), got {cfg.loss.r1_weight}")
    from dcgan import augment

    augment.parse_policy(cfg.augment.policy)
    for part in ("generator", "discriminator"):
        settings = cfg.optimizer[part]
        if not settings.lr > 0:
            raise UserError(f"optimizer.{part}.lr must be > 0, got {settings.lr}")
        if len(settings.betas) != 2 or not all(0.0 <= b < 1.0 for b in settings.betas):
            raise UserError(f"optimizer.{part}.betas must be two numbers in [0, 1), got {list(settings.betas)}")
        if settings.weight_decay < 0:
            raise UserError(f"optimizer.{part}.weight_decay must be >= 0, got {settings.weight_decay}")
        from dcgan.optim import build_optimizer

        build_optimizer([torch.nn.Parameter(torch.zeros(1))], settings, f"optimizer.{part}")  # name and arguments exist
    _at_least("trainer.batch_size", t.batch_size, 1)
    _at_least("trainer.max_steps", t.max_steps, 0)
    _at_least("trainer.epochs", t.epochs, 0)
    if t.max_steps == 0 and t.epochs == 0:
        raise UserError("nothing to train: set trainer.max_steps or trainer.epochs above 0")
    _at_least("trainer.d_steps", t.d_steps, 1)
    for key in ("sample_every", "ckpt_every", "log_every", "grid_size"):
        _at_least(f"trainer.{key}", t[key], 1)
    _at_least("trainer.keep_last", t.keep_last, 0)
    _one_of("trainer.on_divergence", t.on_divergence, ("stop", "rollback"))
    _at_least("trainer.health.collapse_steps", t.health.collapse_steps, 0)
    _at_least("trainer.health.max_rollbacks", t.health.max_rollbacks, 0)
    if not 0.0 < t.health.rollback_lr_factor < 1.0:
        raise UserError(f"trainer.health.rollback_lr_factor must be in (0, 1), got {t.health.rollback_lr_factor}")
    if not 0.0 <= t.health.collapse_d_accuracy <= 1.0 or t.health.min_diversity < 0:
        raise UserError("trainer.health.collapse_d_accuracy must be in [0, 1] and trainer.health.min_diversity >= 0")
    _at_least("trainer.eval_every", t.eval_every, 0)
    if t.eval_every:
        validate_metrics("eval.", cfg.eval)
        _require_inception_weights(cfg.eval)
    from dcgan import distributed

    # Rank r seeds its dropout with seed + r, and the training latents come from seed + 1.
    check_seeds("trainer.seed", t.seed, t.seed + max(1, distributed.world().size - 1))
    if not t.dist_timeout_s > 0:
        raise UserError(f"trainer.dist_timeout_s must be > 0 seconds, got {t.dist_timeout_s}")
    if not 0.0 <= t.ema < 1.0:
        raise UserError(f"trainer.ema must be in [0, 1) (0 turns it off), got {t.ema}")
    for name in cfg.logger:
        _one_of("logger", name, LOGGERS)
    if "jsonl" not in cfg.logger:
        raise UserError(f"logger must include jsonl (metrics.jsonl feeds gan-report and resume), got {list(cfg.logger)}; e.g. logger=[jsonl,tensorboard]")
    if "tensorboard" in cfg.logger:
        from dcgan.log import import_summary_writer

        import_summary_writer()  # fails here, before a run folder exists, when the package is missing
    validate_device("trainer.device", t.device)
    if t.cuda_graphs and (t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())):
        raise UserError("trainer.cuda_graphs=true needs a CUDA device (CUDA graphs replay GPU kernels); set it false on CPU")
    # Building the networks on the meta device costs no memory and proves the architecture can
    # make images of this size and channel count.
    from dcgan import models

    models.check_shapes(cfg)
    _check_memory(cfg)


def _require_inception_weights(m: MetricsConfig | DictConfig) -> None:
    """trainer.eval_every: no Inception weights on this machine is found now, not at the first evaluation."""
    if m.inception_weights:  # validate_metrics proved it is a file
        return
    from dcgan.evaluate import downloaded_weights

    cached = downloaded_weights()
    if not cached.is_file():
        raise UserError(
            f"trainer.eval_every needs torch-fidelity's Inception weights, which are not here (no eval.inception_weights, "
            f"no download at {cached}); set eval.inception_weights=PATH to a local copy, or run once with internet "
            "(e.g. gan-eval) so torch-fidelity downloads them, or set trainer.eval_every=0"
        )


def _check_memory(cfg: TrainConfig | DictConfig) -> None:
    """Refuse a config whose networks clearly cannot fit, before a byte is allocated.

    The estimate is a lower bound (float32 weights, their gradients, and the conv outputs one batch
    keeps for the backward pass; no optimizer state, no data set), compared with all of the device's
    memory, so it only trips on configs that would certainly fail, such as a huge dataset.image_size.
    """
    from dcgan import distributed, models

    batch_per_rank = max(1, cfg.trainer.batch_size // distributed.world().size)
    needed = models.training_bytes_lower_bound(cfg, batch_per_rank)
    where, available = _device_memory(cfg.trainer.device)
    if available and needed > available:
        raise UserError(
            f"this config needs at least {needed / 2**30:,.0f} GiB to train (dataset.image_size={cfg.dataset.image_size}, "
            f"a batch of {batch_per_rank}), more than the {available / 2**30:,.0f} GiB of {where}; use a smaller "
            "dataset.image_size (64 or 128 are typical), or lower trainer.batch_size, generator.width or discriminator.width"
        )


def _device_memory(device: str) -> tuple:
    """(what, bytes) of memory on the device trainer.device names; (None, 0) when it cannot be known here."""
    import os

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "this machine's RAM", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if not torch.cuda.is_available():
        return None, 0  # resolve_device reports cuda without CUDA
    from dcgan import distributed

    index = int(device[5:]) if device.startswith("cuda:") else distributed.world().local_rank
    if index >= torch.cuda.device_count():
        return None, 0
    return f"GPU cuda:{index}", torch.cuda.get_device_properties(index).total_memory


def validate_dataset(d: DatasetConfig | DictConfig) -> None:
    _one_of("dataset.name", d.name, DATASETS)
    _one_of("dataset.channels", d.channels, (1, 3))
    _at_least("dataset.image_size", d.image_size, 8)
    _at_least("dataset.max_images", d.max_images, 0)
    _at_least("dataset.crop", d.crop, 0)
    _one_of("dataset.on_bad_file", d.on_bad_file, ("skip", "error"))
    _one_of("dataset.split", d.split, ("train", "test", "valid", "all"))


def validate_metrics(prefix: str, m: MetricsConfig | DictConfig) -> None:
    """FID/KID settings, shared by gan-eval (prefix "") and gan-train's eval section (prefix "eval.")."""
    if not m.metrics:
        raise UserError(f"{prefix}metrics is empty; ask for fid, kid or both, e.g. {prefix}metrics=[fid,kid]")
    for name in m.metrics:
        _one_of(f"{prefix}metrics", name, METRICS)
    # FID needs a covariance and KID subsets of two or more images, from both sets.
    for key in ("n", "reference_n"):
        if m[key] < 2 and not (key == "reference_n" and m[key] == 0):
            raise UserError(f"{prefix}{key} must be at least 2 (FID needs a covariance, KID subsets of 2+ images), got {m[key]}; use 1000 or more for a meaningful score")
    _at_least(f"{prefix}batch_size", m.batch_size, 1)
    _at_least(f"{prefix}kid_subsets", m.kid_subsets, 1)
    _at_least(f"{prefix}kid_subset_size", m.kid_subset_size, 2)
    check_seeds(f"{prefix}seed", m.seed, m.seed + m.n - 1)  # generated image i comes from seed + i
    if m.inception_weights and not Path(m.inception_weights).expanduser().is_file():
        raise UserError(
            f"{prefix}inception_weights={m.inception_weights} is not a file; point it at a torch-fidelity Inception weights "
            "file (e.g. inception-2015-12-05-fidelity.pth), or leave it unset to let torch-fidelity download its own copy"
        )


def validate_eval(cfg: EvalConfig | DictConfig) -> None:
    """gan-eval: one thing to evaluate (a checkpoint or a folder), one reference (a data set or a folder)."""
    validate_metrics("", cfg)
    validate_device("device", cfg.device)
    if cfg.ckpt and cfg.input1:
        raise UserError("evaluate either ckpt=PATH or input1=FOLDER, not both")
    if not cfg.ckpt and not cfg.input1:
        raise UserError("nothing to evaluate: pass ckpt=PATH (a checkpoint) or input1=FOLDER (images from any tool)")
    if cfg.input2 and cfg.dataset is not None:
        raise UserError("compare with either input2=FOLDER or dataset=NAME, not both")
    if cfg.input1 and not cfg.input2 and cfg.dataset is None:
        raise UserError("input1 needs a reference: input2=FOLDER, or dataset=NAME (e.g. dataset=fashion_mnist dataset.root=PATH)")
    if cfg.dataset is not None:
        validate_dataset(cfg.dataset)


def validate_device(key: str, device: str) -> None:
    if device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()):
        return
    raise UserError(f"{key} must be {DEVICES_HELP}, got {device!r}")


def resolve_device(name: str, key: str = "device") -> torch.device:
    """auto | cpu | cuda | cuda:N as a torch.device; `key` names the setting in error messages."""
    validate_device(key, name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{key}={name} but CUDA is not available here; use {key}=cpu (or auto)")
    return torch.device(name)


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        options = ", ".join(str(a) for a in allowed)
        raise UserError(f"{key} must be one of {options}; got {value!r}")


def _at_least(key: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise UserError(f"{key} must be >= {minimum}, got {value}")


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def train_config_from_yaml(text: str) -> DictConfig:
    """The training config stored in a checkpoint, checked against today's schema."""
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException
    from yaml import YAMLError

    schema = OmegaConf.structured(TrainConfig)
    try:
        return OmegaConf.merge(schema, OmegaConf.create(text))
    except ConfigKeyError as error:
        # Settings are only ever added, so a key we lack means a newer dcgan wrote the checkpoint.
        raise UserError(
            f"the checkpoint's config has {error.full_key}, a setting this version of dcgan does not know: "
            "the checkpoint was written by a newer version; upgrade dcgan (pip install -U dcgan) to read it"
        ) from None
    except (OmegaConfBaseException, YAMLError) as error:
        reason = " ".join(str(error).split()).split(" full_key:")[0][:200]
        raise UserError(f"the checkpoint's stored config does not fit this version of dcgan ({reason}); the checkpoint is damaged or from another version") from None


def exit_with(error: UserError, program: str) -> None:
    # One line, whatever the message holds: scripts and people read the first line of stderr.
    message = " ".join(line.strip() for line in str(error).splitlines())
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(2)


# The seeds torch.manual_seed and torch.Generator.manual_seed take: any 64-bit integer, signed or unsigned.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def check_seeds(key: str, first: int, last: int) -> None:
    """Seeds `first`..`last` (inclusive) are all ones torch can seed with."""
    if first < SEED_MIN or last > SEED_MAX:
        uses = f"seeds {first}..{last}" if last != first else f"seed {first}"
        raise UserError(f"{key} uses {uses}, beyond the 64-bit seeds torch takes ({SEED_MIN}..{SEED_MAX}); use smaller seeds, e.g. {key}=0")


def check_output_file(key: str, path: Path, suffixes: tuple, what: str) -> None:
    """`key=path` names a file we can write, with a suffix in `suffixes`: checked before any work, not after it."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{key}={path} is a folder, but {what} is one file; name the file, e.g. {key}={path / ('out' + suffixes[0])}")
    if path.suffix.lower() not in suffixes:
        found = f"has the suffix {path.suffix}" if path.suffix else "has no suffix"
        raise UserError(f"{key}={path} {found}; {what} is written as {' or '.join(suffixes)}, e.g. {key}={path.with_suffix(suffixes[0])}")
    check_writable_folder(key, path.parent)


def check_writable_folder(key: str, folder: Path) -> None:
    """`folder` exists and takes new files, or can be made inside a folder that does."""
    import tempfile

    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{key}: {existing} is a file, not a folder, so nothing can be written under it; pick another path")
    try:
        # An anonymous file (O_TMPFILE on Linux) proves we may write there and leaves nothing behind.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(f"{key}: cannot write in {existing} ({error.strerror or error}); pick a folder you can write to") from None
