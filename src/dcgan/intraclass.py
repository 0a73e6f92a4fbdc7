"""Intra-class FID of a class-conditional checkpoint (gan-eval): each class's generated images against that class's
reference images, from the very features the overall FID was computed from (metrics.Features).

Which images: generated image i (latent seed `seed + i`) has class i mod C (models.every_class: G(z) draws the
classes in turn), so the overall set is class-balanced and class c's `n_per_class` images are rows c, c + C,
c + 2C, ... of its features. Class c's reference images are the rows of gan-eval's reference set (the seeded
`reference_n` subset of the data set, or all of it) whose label is c, or a seeded subset of `reference_n_per_class`
of them. No image goes through Inception twice, and nothing new is cached: the reference features are the
overall FID's, cached as they are.

How: torch-fidelity's FID of the two row sets (metrics.frechet_distance: mean and covariance, then the Fréchet
distance), the same extractor, layer and weights as the overall FID. Each class costs one 2048 x 2048 eigenvalue
problem (about 10 s on two CPU cores), whatever its image count; `classes=[...]` measures some classes only.

FID is biased upward when few images estimate the covariance, strongly so at a few hundred images per class: two
intra-class FIDs compare only at equal images per class on both sides (the result records both).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig

from dcgan import data
from dcgan.data import DatasetConfig
from dcgan.errors import UserError, at_least, unused
from dcgan.metrics import Features, frechet_distance, seeded_subset

log = logging.getLogger(__name__)

PER_CLASS_MODES = ("auto", "true", "false")
# gan-eval's per-class settings and their defaults (EvalConfig): refused when intra-class FID is not measured.
PER_CLASS_DEFAULTS = {"per_class": "auto", "n_per_class": None, "reference_n_per_class": 0, "classes": None}
METRIC = "intra_class_fid"


def per_class_mode(setting: Any) -> str:
    """per_class as auto, true or false (Hydra reads per_class=true as a bool)."""
    mode = str(setting).strip().lower()
    if mode not in PER_CLASS_MODES:
        raise UserError(f"per_class must be one of {', '.join(PER_CLASS_MODES)}, got {setting!r}")
    return mode


def refuse_per_class_settings(cfg: DictConfig, why: str, fix: str) -> None:
    """Any per-class setting changed from its default has no effect where intra-class FID is not measured."""
    for key, default in PER_CLASS_DEFAULTS.items():
        value = cfg[key]
        if key == "per_class" and per_class_mode(value) != "true":
            continue  # auto and false both mean "not here"
        if value != default:
            written = f"[{','.join(value)}]" if key == "classes" else "true" if key == "per_class" else value
            unused(key, written, why, fix)


@dataclass
class ClassPlan:
    """Which feature rows make up each measured class's two sets."""

    names: Tuple[str, ...]  # every class, by label
    labels: List[int]  # the labels measured
    generated_rows: Dict[int, torch.Tensor]
    reference_rows: Dict[int, torch.Tensor]
    n_per_class: int
    reference_selection: str  # how each class's reference images were picked


def plan_for(
    cfg: DictConfig,
    classes: Tuple[str, ...],
    dataset: Optional[DatasetConfig | DictConfig],
    reference_count: int,
    generated_count: int,
) -> Optional[ClassPlan]:
    """The intra-class measurement gan-eval makes (None: none), checked before any image goes through Inception.

    `classes`: the checkpoint's class names (empty: not conditional); `dataset`: the reference data set (None: a
    folder, without labels); `reference_count`, `generated_count`: the overall sets' sizes."""
    mode = per_class_mode(cfg.per_class)
    if not classes:  # per-class settings were refused as soon as the checkpoint was read
        return None
    if mode == "false":
        refuse_per_class_settings(cfg, "per_class=false", "remove it, or set per_class=auto")
        return None
    why_not = None
    if dataset is None:
        why_not = "the reference is a folder, whose images have no labels; compare with a data set (dataset=NAME)"
    else:
        try:
            labels = reference_labels(dataset, cfg.reference_n, cfg.seed, reference_count)
        except UserError as error:
            why_not = f"the reference's labels cannot be read ({error})"
        else:
            if labels.names != tuple(classes):
                why_not = (
                    f"the checkpoint's classes ({shown(classes)}) are not {dataset.name}'s ({shown(labels.names)}); "
                    "compare with the data set it was trained on"
                )
    if why_not is not None:
        if mode == "true":
            raise UserError(f"per_class=true cannot measure intra-class FID: {why_not}")
        refuse_per_class_settings(cfg, why_not, "remove it")
        log.warning("no intra-class FID: %s", why_not)
        return None
    return class_plan(cfg, tuple(classes), labels.indices, generated_count)


def shown(names: Tuple[str, ...]) -> str:
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")


def reference_labels(
    dataset: DatasetConfig | DictConfig, reference_n: int, seed: int, reference_count: int
) -> data.Labels:
    """The labels of gan-eval's reference images: the same seeded subset metrics.reference_from_dataset picks."""
    labels = data.load_labels(dataset)
    picked = labels.indices[seeded_subset(len(labels.indices), reference_n, seed)]
    if len(picked) != reference_count:  # load_labels is aligned row for row with load_images
        raise RuntimeError(f"{len(picked)} labels for {reference_count} reference images of {dataset.name}")
    return data.Labels(picked, tuple(labels.names))


def class_plan(cfg: DictConfig, names: Tuple[str, ...], reference_labels: torch.Tensor, n: int) -> ClassPlan:
    """Rows of each measured class: generated rows c, c + C, ...; the reference rows labelled c (or a seeded
    subset). A class with too few reference images is refused, naming it."""
    count = len(names)
    n_per_class = n // count if cfg.n_per_class is None else int(cfg.n_per_class)
    at_least("n_per_class", n_per_class, 2)  # FID needs a covariance
    if n_per_class * count > n:
        raise UserError(
            f"n_per_class={n_per_class} needs {n_per_class * count} generated images ({count} classes), more than "
            f"n={n}: class c's images are the overall set's images c, c + {count}, ...; set n={n_per_class * count} "
            "or more, or lower n_per_class"
        )
    at_least("reference_n_per_class", cfg.reference_n_per_class, 0)
    labels = measured_labels(cfg.classes, names)
    wanted = cfg.reference_n_per_class
    generated_rows, reference_rows = {}, {}
    for label in labels:
        rows = torch.nonzero(reference_labels == label).flatten()
        if len(rows) < max(wanted, 2):
            raise UserError(
                f"class {names[label]} has {len(rows)} reference images, fewer than the {max(wanted, 2)} its "
                f"intra-class FID needs{' (reference_n_per_class)' if wanted > 2 else ''}; raise reference_n (0 = "
                "the whole data set) or the data set's dataset.max_images where one is set, lower "
                "reference_n_per_class, or leave the class out with classes=[...]"
            )
        reference_rows[label] = rows[seeded_subset(len(rows), wanted, cfg.seed + label)] if wanted else rows
        generated_rows[label] = torch.arange(label, n_per_class * count, count)
    selection = f"a random subset of {wanted} per class, seed seed + label" if wanted else "all of the class's"
    return ClassPlan(names, labels, generated_rows, reference_rows, n_per_class, selection)


def measured_labels(asked: Optional[List[str]], names: Tuple[str, ...]) -> List[int]:
    """classes=[...] as labels, in the checkpoint's order; every class when None."""
    if asked is None:
        return list(range(len(names)))
    if not asked:
        raise UserError("classes=[] measures no class; name some, e.g. classes=[" + ",".join(names[:2]) + "]")
    try:  # each name as gan-sample's class= reads it: the name, a loose spelling of it, or the index
        return sorted({data.class_index(names, str(name)) for name in asked})
    except UserError as error:
        raise UserError(f"classes: {error}") from None


def intra_class_result(
    features: Features, plan: ClassPlan, overall: Dict[str, Any], show_progress: bool = False
) -> Dict[str, Any]:
    """The intra-class FID entry of gan-eval's results: every measured class's FID, their mean and the worst.

    `overall`: the overall FID/KID's first result, whose stamps this one extends."""
    from tqdm import tqdm

    started = time.perf_counter()
    per_class = []
    interval = 0.5 if sys.stderr.isatty() else 60  # into a file or a pipe, a line a minute at most
    bar = tqdm(plan.labels, desc="Intra-class FID", unit="class", mininterval=interval, disable=not show_progress)
    for label in bar:
        generated_rows, reference_rows = plan.generated_rows[label], plan.reference_rows[label]
        value = frechet_distance(features.generated[generated_rows], features.reference[reference_rows])
        per_class.append(
            {
                "label": label,
                "class": plan.names[label],
                "value": value,
                "generated": len(generated_rows),
                "reference": len(reference_rows),
            }
        )
    mean = sum(c["value"] for c in per_class) / len(per_class)
    worst = max(per_class, key=lambda c: c["value"])
    reference_counts = [c["reference"] for c in per_class]
    return {
        **overall,
        "metric": METRIC,
        "value": mean,  # the mean over the measured classes
        "std": None,
        "mean": mean,
        "worst": {key: worst[key] for key in ("label", "class", "value")},
        "per_class": per_class,
        "generated": {
            **overall["generated"],
            "per_class": plan.n_per_class,
            "per_class_selection": f"images c, c + {len(plan.names)}, ... of the generated set (class i mod C)",
        },
        "reference": {
            **overall["reference"],
            "per_class": min(reference_counts) if len(set(reference_counts)) == 1 else reference_counts,
            "per_class_selection": f"{plan.reference_selection} images in the reference set, by the data's labels",
        },
        "protocol": {
            **{key: value for key, value in overall["protocol"].items() if not key.startswith("kid_")},
            "statistics": "torch-fidelity fid_features_to_statistics and fid_statistics_to_metric per class, on "
            "the overall FID's features",
            "classes_measured": len(plan.labels),
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
