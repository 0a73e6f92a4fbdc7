"""A generator to share: its weights as a safetensors file, and the JSON that rebuilds it.

`gan-sample mode=export format=safetensors` writes the sampling generator's state dict (plain tensors:
no pickled objects, so any safetensors reader opens it without running code) and a JSON description,
both in the file's header metadata (under METADATA_KEY) and beside it as NAME.json for tools that
don't read headers. The JSON holds what `models.build_generator` needs (the generator section, the
image size and channels), which images the run trained on (so mode=neighbors finds them), the output
range, whether the weights are the EMA's, the training step, and for a class-conditional generator its
class names (label i is classes[i]).

`read` turns such a file back into the part of a checkpoint that sampling uses (the keys of state.py),
so `gan-sample ckpt=G.safetensors` (and gan-eval) work as with a .pt checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dcgan import files
from dcgan.errors import UserError
from dcgan.state import CLASSES, CONFIG_YAML, GENERATOR, GENERATOR_EMA, STEP

FORMAT = "dcgan-generator"
FORMAT_VERSION = 2  # bump when a reader of this version would misread the JSON; readers refuse newer versions
# Version 2 added `classes` (a class-conditional generator): only such files are written as 2, so a reader of
# version 1 still reads every unconditional export and refuses a conditional one it would build wrongly.
CONDITIONAL_VERSION = 2
METADATA_KEY = "dcgan"  # safetensors metadata values are strings: this one holds the JSON
SUFFIX = ".safetensors"
# The dataset settings that decide which images the run trained on (mode=neighbors loads them again); the
# others (download, cache_dir, num_workers, ...) are how one machine reads them, so a reader uses its defaults.
DATASET_KEYS = ("name", "root", "split", "crop", "max_images", "image_size", "channels")
# What a file must state; anything else missing takes the schema's default, as an older checkpoint's config does.
REQUIRED = {"generator": ("arch", "z_dim", "z_distribution"), "dataset": ("image_size", "channels")}
# Every registered generator ends in tanh.
OUTPUT = {"range": [-1, 1], "activation": "tanh", "shape": "[batch, channels, image_size, image_size]"}


def import_safetensors(what: str):
    """The safetensors module, or a UserError saying what to install."""
    try:
        import safetensors
        import safetensors.torch  # noqa: F401  (safetensors.torch.save)
    except ImportError:
        raise UserError(f"{what} needs the safetensors package: pip install 'dcgan[export]'") from None
    return safetensors


def is_portable(path: str | Path) -> bool:
    """A file to read with `read` rather than checkpoint.load: told by its suffix."""
    return Path(path).suffix.lower() == SUFFIX


def sidecar(path: Path) -> Path:
    """The JSON written beside G.safetensors: G.json."""
    return Path(path).with_suffix(".json")


def describe(train_cfg: DictConfig, weights: str, step: int, classes: Sequence[str] = ()) -> Dict[str, Any]:
    """The JSON of an export: what rebuilds the generator, what it outputs, and where its weights come from."""
    dataset = OmegaConf.to_container(train_cfg.dataset, resolve=True)
    return {
        "format": FORMAT,
        "format_version": CONDITIONAL_VERSION if classes else 1,
        "generator": OmegaConf.to_container(train_cfg.generator, resolve=True),
        "dataset": {key: dataset[key] for key in DATASET_KEYS if key in dataset},
        "output": OUTPUT,
        "ema": weights == "ema",
        "step": int(step),
        **({"classes": list(classes)} if classes else {}),  # G(z, labels): label i draws classes[i]
    }


def save(G: nn.Module, description: Dict[str, Any], path: Path) -> List[Path]:
    """Write G's state dict with `description` to `path`, and the description to its sidecar; returns both paths.

    Each file is written under a temporary name and renamed, so a reader never meets half of one.
    """
    safetensors = import_safetensors("format=safetensors")
    # safetensors stores raw buffers: CPU, contiguous, each tensor its own (state_dict shares none in G).
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in G.state_dict().items()}
    # Bytes through files.atomic_write rather than save_file, which makes its files private (mode 0600): this
    # one is for sharing, so it gets the permissions any other file written here gets. A generator is megabytes.
    content = safetensors.torch.save(tensors, metadata={METADATA_KEY: json.dumps(description)})
    files.atomic_write(path, lambda file: file.write(content))
    files.atomic_write_text(sidecar(path), json.dumps(description, indent=2) + "\n")
    return [path, sidecar(path)]


def read(path: Path, use_ema: bool = True) -> Dict[str, Any]:
    """An exported file as a checkpoint's sampling keys: CONFIG_YAML, GENERATOR (and GENERATOR_EMA), STEP."""
    path = Path(path)
    safetensors = import_safetensors(f"ckpt={path}")
    if not path.is_file():
        raise UserError(f"{path} is not a file; check the path (gan-sample mode=export format=safetensors makes one)")
    try:
        with safetensors.safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except Exception as error:  # SafetensorError for a truncated or foreign file, OSError for an unreadable one
        reason = " ".join(str(error).split())[:200]
        raise UserError(
            f"{path} is unreadable as a safetensors file ({reason}); it may be truncated or damaged: export it again "
            "with gan-sample mode=export format=safetensors"
        ) from None
    description = parse_description(path, metadata)
    if description["ema"] and not use_ema:
        raise UserError(
            f"{path} holds only the EMA generator's weights, so ema=false has nothing to load; drop ema=false, or "
            "export the raw generator from the checkpoint with mode=export format=safetensors ema=false"
        )
    return {
        CONFIG_YAML: rebuild_yaml(description),
        GENERATOR: tensors,
        GENERATOR_EMA: tensors if description["ema"] else None,
        STEP: description["step"],
        **({CLASSES: description["classes"]} if description.get("classes") else {}),
    }


def parse_description(path: Path, metadata: Dict[str, str]) -> Dict[str, Any]:
    """The JSON in the file's header, checked for what `read` relies on; UserError naming what is wrong."""
    if METADATA_KEY not in metadata:
        raise UserError(
            f"{path} is a safetensors file but not a dcgan generator export: its header has no {METADATA_KEY!r} "
            "metadata saying how to rebuild the network; use a file made by gan-sample mode=export format=safetensors"
        )
    damaged = f"{path} has damaged dcgan metadata"
    try:
        description = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise UserError(f"{damaged} (not JSON: {error}); export it again") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise UserError(f"{damaged} (its format is not {FORMAT!r}); export it again")
    version = description.get("format_version")
    if not isinstance(version, int):
        raise UserError(f"{damaged} (no format_version); export it again")
    if version > FORMAT_VERSION:
        raise UserError(
            f"{path} was written by a newer version of dcgan (format {version}, this one reads up to "
            f"{FORMAT_VERSION}); upgrade dcgan (pip install -U dcgan) to read it"
        )
    missing = [
        f"{part}.{key}"
        for part, keys in REQUIRED.items()
        for key in keys
        if not isinstance(description.get(part), dict) or key not in description[part]
    ]
    if missing or not isinstance(description.get("ema"), bool) or not isinstance(description.get("step"), int):
        lacks = ", ".join(missing) or "ema or step"
        raise UserError(f"{damaged} (it lacks {lacks}); export it again")
    classes = description.get("classes", [])
    if not isinstance(classes, list) or len(classes) == 1 or not all(isinstance(name, str) for name in classes):
        raise UserError(f"{damaged} (its classes are not a list of two or more names); export it again")
    return description


def rebuild_yaml(description: Dict[str, Any]) -> str:
    """The config sections the JSON carries, as the YAML text a checkpoint stores (config.train_config_from_yaml).

    A file that does not name its data set gets the name "" (no data set's), so mode=neighbors, which needs
    the training images, refuses it (sample.training_images) instead of searching the schema's default data set.
    """
    dataset = {"name": "", **description["dataset"]}
    sections = {"generator": description["generator"], "dataset": dataset}
    return yaml.safe_dump({**sections, "conditional": bool(description.get("classes"))}, sort_keys=False)
