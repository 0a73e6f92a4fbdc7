"""`gan-eval`: FID and KID of a checkpoint's generator, or of a folder of images, against a data set or a folder.

On a class-conditional checkpoint, also the intra-class FID from the same features (each class against its own
reference images). Results are printed as a table and written as JSON (beside the checkpoint by default). How
the scores are measured, what every result is stamped with, and what n means for a score: docs/evaluation.md
(the code: metrics.py and intraclass.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig

from dcgan import config, data, files, intraclass
from dcgan.data import DatasetConfig, validate_dataset
from dcgan.distributed import resolve_device, validate_device
from dcgan.errors import UserError, check_output_file
from dcgan.metrics import (
    FolderImages,
    ImageSet,
    ImageSource,
    MetricsConfig,
    folder_stamp,
    generated_from_model,
    measure_with_features,
    reference_from_dataset,
    reference_from_folder,
    validate_metrics,
)
from dcgan.sample import load_generator
from dcgan.state import CLASSES, STEP, sampling_weights

log = logging.getLogger(__name__)


@dataclass
class EvalConfig(MetricsConfig):
    ckpt: Optional[str] = None  # the checkpoint whose generator makes the `n` images (EMA weights when present)
    input1: Optional[str] = None  # or: a folder of images made by any tool
    input2: Optional[str] = None  # a folder of reference images, instead of a data set
    dataset: Optional[DatasetConfig] = (
        None  # the reference data set (dataset=NAME); None = the checkpoint's training set
    )
    ema: bool = True  # use the EMA generator when the checkpoint has one
    device: str = "auto"
    out: Optional[str] = (
        None  # results JSON; None = beside the checkpoint (last.pt -> last.eval.json) or input1's folder
    )
    # A class-conditional checkpoint: intra-class FID beside the overall scores (dcgan/intraclass.py).
    per_class: str = "auto"  # auto (on for a conditional checkpoint against a labelled data set) | true | false
    n_per_class: Optional[int] = None  # generated images per class, taken from the n; None = n // classes
    reference_n_per_class: int = 0  # reference images per class: 0 = all of the class's in the reference set
    classes: Optional[List[str]] = None  # the classes measured, by name (each costs ~10 s on a CPU); None = all
    # Instead of evaluating: write a half-precision copy of `inception_weights` here (48 MB instead of 96) and exit,
    # to stage the weights where files are size-limited; torch-fidelity casts it back to fp32 when it loads it.
    fp16_copy: Optional[str] = None


config.register_schema("eval_schema", EvalConfig)


def validate_eval(cfg: EvalConfig | DictConfig) -> None:
    """gan-eval: one thing to evaluate (a checkpoint or a folder), one reference (a data set or a folder)."""
    validate_metrics("", cfg)
    validate_device("device", cfg.device)
    intraclass.per_class_mode(cfg.per_class)
    if cfg.ckpt and cfg.input1:
        raise UserError("evaluate either ckpt=PATH or input1=FOLDER, not both")
    if not cfg.ckpt and not cfg.input1:
        raise UserError("nothing to evaluate: pass ckpt=PATH (a checkpoint) or input1=FOLDER (images from any tool)")
    if cfg.input2 and cfg.dataset is not None:
        raise UserError("compare with either input2=FOLDER or dataset=NAME, not both")
    if cfg.input1:
        intraclass.refuse_per_class_settings(cfg, "a folder's images have no class", "remove it")
    if cfg.input1 and not cfg.input2 and cfg.dataset is None:
        raise UserError(
            "input1 needs a reference: input2=FOLDER, or dataset=NAME (e.g. dataset=fashion_mnist dataset.root=PATH)"
        )
    if cfg.dataset is not None:
        validate_dataset(cfg.dataset)


# ---------------------------------------------------------------- gan-eval


def run(cfg: DictConfig) -> Tuple[List[Dict[str, Any]], Path]:
    """Evaluate what `cfg` names; returns (results, path of the JSON written)."""
    validate_eval(cfg)
    out = results_path(cfg)
    check_output_file("out", out, (".json",), "gan-eval's result")  # before the evaluation, not after it
    device = resolve_device(cfg.device)
    classes: Tuple[str, ...] = ()
    if cfg.ckpt:
        generated, train_cfg, classes = generated_from_checkpoint(Path(cfg.ckpt), cfg, device)
        default_reference = train_cfg.dataset
    else:
        folder = Path(cfg.input1)
        images = FolderImages(folder, cfg.n, cfg.seed)
        generated = ImageSource(images, folder_stamp(folder, images))
        default_reference = None
    dataset = None
    if cfg.input2:
        reference = reference_from_folder(Path(cfg.input2), cfg.reference_n, cfg.seed)
        log.info(
            "reference: %s", counted(len(reference.images), f"folder {cfg.input2}", "reference_n", cfg.reference_n)
        )
    else:
        dataset = cfg.dataset if cfg.dataset is not None else default_reference
        reference = reference_from_dataset(dataset, cfg.reference_n, cfg.seed)
        log.info(
            "reference: %s", counted(len(reference.images), data.describe(dataset), "reference_n", cfg.reference_n)
        )
    log.info("generated: %s", counted(len(generated.images), generated.stamp["source"], "n", cfg.n))
    if generated.stamp["image_size"] != reference.stamp["image_size"]:
        log.warning(
            "generated images are %spx, reference images %spx: both are resized to 299px by the extractor, "
            "but a size mismatch alone raises FID",
            generated.stamp["image_size"],
            reference.stamp["image_size"],
        )
    plan = intraclass.plan_for(cfg, classes, dataset, len(reference.images), len(generated.images))
    results, features = measure_with_features(generated, reference, cfg, device, show_progress=True)
    if plan is not None:
        results.append(intraclass.intra_class_result(features, plan, results[0], show_progress=True))
    try:
        write_json({"results": results}, out)
    except OSError as error:  # checked writable before measuring, so rare (a full disk): keep the scores
        scores = ", ".join(f"{r['metric'].upper()} {r['value']:.6g}" for r in results)
        raise UserError(f"could not write {out} ({error.strerror or error}); the scores were {scores}") from None
    return results, out


def write_fp16_copy(cfg: DictConfig) -> str:
    """gan-eval fp16_copy=OUT inception_weights=FP32: the copy, atomically; returns a line saying what was written."""
    from dcgan.metrics import file_sha256

    source = cfg.inception_weights
    if not source or not Path(source).expanduser().is_file():
        raise UserError(f"fp16_copy needs the fp32 weights to convert: pass inception_weights=PATH (got {source})")
    out = Path(cfg.fp16_copy)
    check_output_file("fp16_copy", out, (".pth", ".pt"), "the weights copy")
    try:
        state = torch.load(Path(source).expanduser(), map_location="cpu", weights_only=True)
        half = {key: value.half() if value.is_floating_point() else value for key, value in state.items()}
    except Exception as error:  # torch.load fails in many ways on a file that is not a state dict
        reason = f"{type(error).__name__}: {error}"
        raise UserError(f"inception_weights={source} is not a weights file torch can read ({reason})") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write(out, lambda file: torch.save(half, file))
    stat = out.stat()
    return f"wrote {out}: {stat.st_size:,} bytes, sha256 {file_sha256(str(out), stat.st_size, stat.st_mtime_ns)}"


def counted(count: int, what: str, setting: str, asked: int) -> str:
    """ "5000 images of mnist_tiny (...) (reference_n=10000)": the count really used, and the setting (an upper
    bound) when it differs."""
    differs = f" ({setting}={asked})" if asked and count != asked else ""
    return f"{count} images of {what}{differs}"


def results_path(cfg: DictConfig) -> Path:
    """out=, else beside the checkpoint (last.pt -> last.eval.json) or beside input1's folder."""
    if cfg.out:
        return Path(cfg.out)
    if cfg.ckpt:
        ckpt = Path(cfg.ckpt)
        return ckpt.with_suffix(".eval.json") if ckpt.is_file() else ckpt / "eval.json"
    folder = Path(cfg.input1)
    return folder.parent / f"{folder.resolve().name}.eval.json"


def generated_from_checkpoint(
    path: Path, cfg: DictConfig, device: torch.device
) -> Tuple[ImageSource, DictConfig, Tuple[str, ...]]:
    """The `n` generated images, the checkpoint's training config, and its class names (empty: not conditional)."""
    G, train_cfg, saved = load_generator(path, device, cfg.ema)
    classes = tuple(saved.get(CLASSES) or ())
    if not classes:  # before the n images are made
        intraclass.refuse_per_class_settings(cfg, "the checkpoint is not class-conditional", "remove it")
    images = generated_from_model(
        G, train_cfg.generator.z_dim, train_cfg.generator.z_distribution, cfg.n, cfg.seed, device
    )
    stamp = {
        "source": f"checkpoint {path}",
        "weights": sampling_weights(saved, cfg.ema)[1],
        "step": int(saved[STEP]),
        "count": len(images),
        "selection": f"latent seeds {cfg.seed}..{cfg.seed + cfg.n - 1} ({train_cfg.generator.z_distribution})",
        "image_size": int(images.shape[-1]),
        "channels": int(images.shape[1]),
    }
    if classes:  # G(z) draws the classes in turn (models.every_class)
        stamp["classes"] = f"{len(classes)} classes drawn equally: image i has class i mod {len(classes)}"
    return ImageSource(ImageSet(images), stamp), train_cfg, classes


def write_json(content: Dict[str, Any], path: Path) -> None:
    files.atomic_write_text(path, json.dumps(content, indent=2) + "\n")


def format_table(results: List[Dict[str, Any]]) -> str:
    """One line per metric with its protocol: counts, reference split, image sizes, weights hash, library; then,
    for a conditional checkpoint, one line per class of the intra-class FID."""
    header = ("metric", "value", "generated", "reference", "size gen/ref", "weights sha256", "library", "seconds")
    rows = [header]
    for r in results:
        g, ref, p = r["generated"], r["reference"], r["protocol"]
        value = f"{r['value']:.5f}" if r["metric"] == "kid" else f"{r['value']:.3f}"
        if r["std"] is not None:
            value += f" ± {r['std']:.5f}"
        elif r["metric"] == "kid":  # one subset of every image (n <= kid_subset_size): no spread to show
            value += " (one subset: no spread)"
        count, ref_count = g["count"], ref["count"]
        if r["metric"] == intraclass.METRIC:  # the mean over classes, at these counts per class
            value = f"{value} (mean)"
            count, ref_count = f"{g['per_class']}/class", f"{per_class_counts(r['per_class'])}/class"
        what = f"{count} ({g.get('weights', 'images')}{', step ' + str(g['step']) if 'step' in g else ''})"
        rows.append(
            (
                r["metric"].upper(),
                value,
                what,
                f"{ref_count} of {ref['source'].split(' ', 2)[-1]} / {ref['split']}",
                f"{g['image_size']}/{ref['image_size']}",
                p["weights_sha256"][:12],
                p["library"],
                f"{r['seconds']:.0f}",
            )
        )
    lines = aligned(rows)
    for r in results:
        if r["metric"] == intraclass.METRIC:
            lines += ["", *per_class_table(r)]
    return "\n".join(lines)


def per_class_table(r: Dict[str, Any]) -> List[str]:
    """The intra-class FID result's classes, one line each, then their mean and the worst."""
    rows = [("label", "class", "FID", "generated", "reference")]
    rows += [(c["label"], c["class"], f"{c['value']:.3f}", c["generated"], c["reference"]) for c in r["per_class"]]
    count, worst = len(r["per_class"]), r["worst"]
    return [
        "intra-class FID (each class's generated images against its reference images):",
        *aligned(rows),
        f"mean {r['mean']:.3f} over {count} class{'es' if count > 1 else ''}; worst: class {worst['class']} (label "
        f"{worst['label']}) {worst['value']:.3f}",
    ]


def per_class_counts(per_class: List[Dict[str, Any]]) -> str:
    """The reference images per class as the table shows them: "500", or "480-530" when the classes differ."""
    counts = [c["reference"] for c in per_class]
    return str(min(counts)) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def aligned(rows: List[Tuple[Any, ...]]) -> List[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
