"""Class labels: which class each training image is, what the classes are called, and finding one by name.

`Labels` is what a data set hands conditional training: one class index per image, row for row with the
images, and the class names by index. data.py finds the files a data set keeps its labels in; this module
reads them (IDX label files, CelebA's attribute table), names the classes, and matches the names users type
(`class_index`). It knows nothing about where data lives, so it sits below data.py.
"""

from __future__ import annotations

import difflib
import gzip
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch

from dcgan.errors import UserError

IDX_LABELS_MAGIC = 0x00000801
DIGIT_CLASSES = tuple(str(digit) for digit in range(10))
# torchvision's FashionMNIST.classes, by label value.
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# k attributes make 2^k classes; past 32 most combinations hold few CelebA faces (some none at all), so a
# conditional G would be asked for classes it has hardly seen.
MAX_ATTRIBUTES = 5
ABSENT = "no_"  # the prefix of an attribute a class lacks: no_Smiling
JOIN = "+"  # between attributes in a class name: Smiling+no_Male (Hydra reads it unquoted: class=Smiling+no_Male)
CLASSES_SHOWN = 12  # classes a log line or an error lists before shortening


@dataclass(frozen=True)
class Labels:
    """The classes of a data set's images, aligned row for row with what data.load_images returns."""

    indices: torch.Tensor  # int64 [N], one class index per image
    names: Tuple[str, ...]  # class names by index; len(names) = number of classes (>= 2)

    def __post_init__(self) -> None:
        # A registered labels loader that breaks these is a bug in that code, not a user mistake: ValueError.
        if self.indices.dtype != torch.int64 or self.indices.dim() != 1:
            raise ValueError(f"class indices must be int64 [N], got {self.indices.dtype} {tuple(self.indices.shape)}")
        if len(self.names) < 2 or len(set(self.names)) != len(self.names):
            raise ValueError(f"class names must be 2 or more distinct names, got {self.names!r}")
        if len(self.indices) and not (0 <= int(self.indices.min()) and int(self.indices.max()) < len(self.names)):
            raise ValueError(f"class indices must lie in 0..{len(self.names) - 1}")

    def counts(self) -> List[int]:
        """Images per class, by class index."""
        return torch.bincount(self.indices, minlength=len(self.names)).tolist()

    def describe(self) -> str:
        """One log line: "10 classes: 0 (500), 1 (500), ...", the list shortened past CLASSES_SHOWN classes."""
        counts = self.counts()
        shown = [f"{name} ({count})" for name, count in zip(self.names, counts, strict=True)]
        if len(shown) > CLASSES_SHOWN:
            fewest = min(range(len(counts)), key=counts.__getitem__)
            rest = len(shown) - (CLASSES_SHOWN - 2)
            shown = shown[: CLASSES_SHOWN - 2] + [f"and {rest} more (fewest: {self.names[fewest]} ({counts[fewest]}))"]
        return f"{len(self.names)} classes: {', '.join(shown)}"


# --------------------------------------------------------------------------------------------
# Finding a class by what the user typed


def class_index(names: Sequence[str], wanted: str) -> int:
    """The index of the class `wanted` names: its exact name; else the one name equal to it ignoring case,
    spaces and punctuation ("ankle_boot" for "Ankle boot"); else an index typed as digits; else the one name
    it begins ("t-shirt" for "T-shirt/top"). Anything else is a UserError naming the nearest classes."""
    names, wanted = list(names), str(wanted)
    if wanted in names:
        return names.index(wanted)
    # An index below 0 is refused before the loose match, which drops the sign: "-1" would find class "1".
    if re.fullmatch(r"-\d+", wanted.strip()):
        raise _no_index(wanted.strip(), names)
    key, normals = _normal(wanted), [_normal(name) for name in names]
    same = [i for i, normal in enumerate(normals) if normal == key]
    if len(same) == 1:
        return same[0]
    if wanted.strip().isdigit():
        index = int(wanted)
        if index < len(names):
            return index
        raise _no_index(str(index), names)
    starting = same or [i for i, normal in enumerate(normals) if key and normal.startswith(key)]
    if len(starting) == 1:
        return starting[0]
    if starting:
        matches = " or ".join(names[i] for i in starting[:CLASSES_SHOWN])
        raise UserError(f"class {wanted!r} could be {matches}; give the whole name")
    nearest = difflib.get_close_matches(key, normals, n=3, cutoff=0.5)
    guess = f" did you mean {' or '.join(names[normals.index(n)] for n in nearest)}?" if nearest else ""
    raise UserError(f"no class {wanted!r};{guess} classes: {listing(names)}")


def _no_index(typed: str, names: Sequence[str]) -> UserError:
    return UserError(f"no class {typed}: the {len(names)} classes are numbered 0..{len(names) - 1} ({listing(names)})")


def _normal(name: str) -> str:
    """Lower case, without spaces or punctuation: "T-shirt/top" -> "tshirttop"."""
    return re.sub(r"[\W_]+", "", name.casefold())


def listing(names: Sequence[str]) -> str:
    """Class names for a message, shortened past CLASSES_SHOWN."""
    if len(names) <= CLASSES_SHOWN:
        return ", ".join(names)
    return f"{', '.join(names[: CLASSES_SHOWN - 2])}, ... ({len(names)} in all)"


# --------------------------------------------------------------------------------------------
# MNIST-style IDX label files


def read_idx_labels(path: Path, classes: int) -> np.ndarray:
    """Parse an IDX label file (optionally gzipped): uint8 [N], each below `classes`."""
    data = _read(path)
    if len(data) < 8:
        raise UserError(
            f"{path} is too short to be an IDX label file ({len(data)} bytes); delete it and download it again"
        )
    magic, count = struct.unpack(">II", data[:8])
    if magic != IDX_LABELS_MAGIC:
        raise UserError(
            f"{path} is not an IDX label file (magic number {magic:#010x}, expected {IDX_LABELS_MAGIC:#010x}); "
            "check that it is the *-labels-idx1-ubyte file"
        )
    if len(data) != 8 + count:
        raise UserError(
            f"{path} is truncated or corrupt ({len(data)} bytes, expected {8 + count} for {count} labels); "
            "delete it and download it again"
        )
    labels = np.frombuffer(data, dtype=np.uint8, offset=8)
    if count and int(labels.max()) >= classes:
        raise UserError(
            f"{path} holds the label {int(labels.max())}, but the data set has {classes} classes (0..{classes - 1}); "
            "the file is corrupt: delete it and download it again"
        )
    return labels.copy()  # writable, as torch.from_numpy wants


def idx_count(path: Path) -> int:
    """The item count in an IDX file's header, reading only the header."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            header = file.read(8)
    except (OSError, EOFError, zlib.error) as error:
        raise UserError(f"{path} cannot be read ({error}); delete it and download it again") from None
    if len(header) < 8:
        raise UserError(f"{path} is too short to be an IDX file ({len(header)} bytes); delete it and download it again")
    return struct.unpack(">II", header)[1]


def _read(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            return file.read()
    except (OSError, EOFError, zlib.error) as error:
        raise UserError(f"{path} cannot be read ({error}); delete it and download it again") from None


# --------------------------------------------------------------------------------------------
# CelebA attributes: k chosen attributes -> 2^k classes


def check_attribute_list(attributes: Sequence[str]) -> None:
    """What can be said of dataset.attributes without the attribute file: how many, and no repeats."""
    attributes = list(attributes)
    if len(attributes) > MAX_ATTRIBUTES:
        raise UserError(
            f"dataset.attributes has {len(attributes)} attributes, more than the {MAX_ATTRIBUTES} allowed: k "
            f"attributes make 2^k classes, and past {2**MAX_ATTRIBUTES} many hold too few faces to learn; "
            "choose fewer"
        )
    repeated = sorted({a for a in attributes if attributes.count(a) > 1})
    if repeated:
        raise UserError(f"dataset.attributes names {', '.join(repeated)} more than once; give each attribute once")


def attribute_header(path: Path) -> Tuple[int, List[str]]:
    """(image count, attribute names): the first two lines of a list_attr_celeba.txt."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            lines = [file.readline(), file.readline()]
    except OSError as error:
        raise UserError(f"{path} cannot be read ({error.strerror or error}); download it again") from None
    if not lines[0].strip().isdigit() or not lines[1].split():
        raise UserError(
            f"{path} is not CelebA's attribute list (its first line should be the image count, its second the "
            "attribute names); download list_attr_celeba.txt again"
        )
    return int(lines[0]), lines[1].split()


def check_attributes_known(attributes: Sequence[str], path: Path) -> List[str]:
    """Each chosen attribute is one the file has (else the nearest name, and where to see them all); returns
    every attribute name of the file, in its column order."""
    known = attribute_header(path)[1]
    for attribute in attributes:
        if attribute not in known:
            folded = {name.casefold(): name for name in known}
            nearest = folded.get(attribute.casefold()) or next(
                iter(difflib.get_close_matches(attribute, known, n=1, cutoff=0.0)), None
            )
            raise UserError(
                f"CelebA has no attribute {attribute!r} in dataset.attributes; did you mean {nearest}? All "
                f"{len(known)} names are on the second line of {path}"
            )
    return known


def read_attributes(path: Path, attributes: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """(image file names [M], whether each image has each chosen attribute: bool [M, k]) from list_attr_celeba.txt.

    One numpy pass over the text (a fifth of a second for CelebA's 202,599 rows), reading only the columns asked for.
    """
    known = check_attributes_known(attributes, path)
    columns = (0, *(1 + known.index(a) for a in attributes))
    try:
        table = np.loadtxt(path, dtype=str, skiprows=2, usecols=columns, ndmin=2, encoding="utf-8")
    except (ValueError, IndexError, OSError) as error:
        raise UserError(
            f"{path} cannot be parsed as CelebA's attribute list ({error}); download list_attr_celeba.txt again"
        ) from None
    declared = attribute_header(path)[0]
    if len(table) != declared:
        raise UserError(
            f"{path} lists {len(table)} images, but its first line says {declared}: it is truncated or corrupt; "
            "download list_attr_celeba.txt again"
        )
    values = table[:, 1:]
    if not np.isin(values, ("1", "-1")).all():
        raise UserError(f"{path} holds values other than 1 and -1; download list_attr_celeba.txt again")
    return table[:, 0], values == "1"


def combination_names(attributes: Sequence[str]) -> Tuple[str, ...]:
    """The 2^k class names, first attribute most significant, having it before lacking it:
    [Smiling, Male] -> Smiling+Male, Smiling+no_Male, no_Smiling+Male, no_Smiling+no_Male."""
    k = len(attributes)
    return tuple(
        JOIN.join(("" if not (index >> (k - 1 - j)) & 1 else ABSENT) + a for j, a in enumerate(attributes))
        for index in range(2**k)
    )


def combination_indices(present: np.ndarray) -> torch.Tensor:
    """bool [N, k] -> the class index of each row in combination_names' order: int64 [N]."""
    k = present.shape[1]
    weights = 1 << np.arange(k - 1, -1, -1, dtype=np.int64)  # first attribute most significant
    return torch.from_numpy((~present).astype(np.int64) @ weights)
