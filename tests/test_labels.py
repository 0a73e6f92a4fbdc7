"""Tests of class labels (dcgan.labels, data.load_labels): every labelled data set built for real on disk, labels
checked against the pixels of the images they are paired with, and each way a data set can lack labels."""

from __future__ import annotations

import gzip
import io
import shlex
import struct
import zipfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from PIL import Image

from dcgan import data
from dcgan.data import DatasetConfig, check_labels_available, class_index, load_images, load_labels, validate_dataset
from dcgan.errors import UserError
from dcgan.labels import DIGIT_CLASSES, FASHION_MNIST_CLASSES, Labels, combination_names
from dcgan.log import class_argument

from conftest import DEBIAN_FASHION_MNIST


@pytest.fixture(scope="module")
def tiny():
    with np.load(data.MNIST_TINY) as archive:
        return archive["images"], archive["labels"]


def class_means(images: torch.Tensor, labels: Labels) -> List[float]:
    """Mean pixel value of each class's images: a fingerprint that misaligned labels would flatten."""
    return [images[labels.indices == c].float().mean().item() for c in range(len(labels.names))]


# --------------------------------------------------------------------------------------------
# mnist_tiny, MNIST and Fashion-MNIST


def test_mnist_tiny_labels_line_up_with_its_digits():
    cfg = DatasetConfig(name="mnist_tiny")
    images, labels = load_images(cfg), load_labels(cfg)
    assert labels.names == tuple("0123456789") and labels.indices.dtype == torch.int64
    assert labels.counts() == [500] * 10 and len(labels.indices) == len(images)
    means = class_means(images, labels)
    # Ones carry the least ink and zeros the most: true of MNIST, and lost if labels were paired with other images.
    assert min(range(10), key=means.__getitem__) == 1 and max(range(10), key=means.__getitem__) == 0
    assert labels.describe().startswith("10 classes: 0 (500), 1 (500), 2 (500)")


def test_mnist_tiny_max_images_cuts_the_labels_as_the_images(tiny):
    labels = load_labels(DatasetConfig(name="mnist_tiny", max_images=37))
    assert labels.indices.tolist() == tiny[1][:37].tolist()


def write_idx(path: Path, array: np.ndarray, magic: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def write_mnist(folder: Path, images: np.ndarray, labels: np.ndarray, split: str = "train") -> Path:
    write_idx(folder / f"{split}-images-idx3-ubyte.gz", images, 0x803)
    return write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels, 0x801)


@pytest.mark.parametrize("name, folder", [("mnist", ""), ("mnist", "MNIST/raw"), ("fashion_mnist", "raw")])
def test_idx_label_files_beside_the_images(tmp_path, tiny, name, folder):
    write_mnist(tmp_path / folder, tiny[0][:60], tiny[1][:60])
    write_mnist(tmp_path / folder, tiny[0][60:90], tiny[1][60:90], split="t10k")
    cfg = DatasetConfig(name=name, root=str(tmp_path), download=False, max_images=50)
    check_labels_available(cfg)
    assert load_labels(cfg).indices.tolist() == tiny[1][:50].tolist()
    test = load_labels(DatasetConfig(name=name, root=str(tmp_path), download=False, split="test"))
    assert test.indices.tolist() == tiny[1][60:90].tolist()
    assert test.names[9] == ("9" if name == "mnist" else "Ankle boot")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw[:-5], "truncated or corrupt"),
        (lambda raw: raw[:6], "too short to be an IDX label file"),
        (lambda raw: struct.pack(">I", 0x803) + raw[4:], "not an IDX label file"),
        (lambda raw: raw[:8] + bytes([12]) + raw[9:], "holds the label 12, but the data set has 10 classes"),
    ],
)
def test_damaged_label_file_is_one_clear_error(tmp_path, tiny, damage, message):
    path = write_mnist(tmp_path, tiny[0][:40], tiny[1][:40])
    path.write_bytes(gzip.compress(damage(gzip.decompress(path.read_bytes()))))
    for call in (check_labels_available, load_labels):
        with pytest.raises(UserError, match=message) as caught:
            call(DatasetConfig(name="mnist", root=str(tmp_path), download=False))
        assert "train-labels-idx1-ubyte.gz" in str(caught.value)


def test_cut_gzip_and_count_mismatch(tmp_path, tiny):
    path = write_mnist(tmp_path, tiny[0][:40], tiny[1][:40])
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match="cannot be read"):
        load_labels(DatasetConfig(name="mnist", root=str(tmp_path), download=False))
    write_mnist(tmp_path, tiny[0][:40], tiny[1][:39])
    with pytest.raises(UserError, match="has 39 labels but .*train-images-idx3-ubyte.gz has 40 images"):
        check_labels_available(DatasetConfig(name="mnist", root=str(tmp_path), download=False))


def test_missing_label_file_says_which_file_to_put_where(tmp_path, tiny):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", tiny[0][:10], 0x803)
    cfg = DatasetConfig(name="fashion_mnist", root=str(tmp_path), download=False, split="test")
    data.check_available(cfg)  # the images are there
    with pytest.raises(UserError, match="could not find or download Fashion-MNIST's labels under") as caught:
        check_labels_available(cfg)
    assert f"put the IDX label file t10k-labels-idx1-ubyte.gz in {tmp_path}" in str(caught.value)


def test_labels_come_from_torchvision_when_no_file_is_there(tmp_path, tiny, monkeypatch):
    import torchvision

    class Downloaded:  # what torchvision.datasets.MNIST gives after downloading
        def __init__(self, root, train, download):
            assert (root, train, download) == (str(tmp_path), True, True)
            self.targets = torch.from_numpy(tiny[1][:40].astype(np.int64))

    write_idx(tmp_path / "train-images-idx3-ubyte.gz", tiny[0][:40], 0x803)
    monkeypatch.setattr(torchvision.datasets, "MNIST", Downloaded)
    labels = load_labels(DatasetConfig(name="mnist", root=str(tmp_path), download=True, max_images=30))
    assert labels.indices.tolist() == tiny[1][:30].tolist()


@pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(),
    reason="Debian's fashion-mnist package (/usr/share/datasets/fashion-mnist) is not installed",
)
def test_debian_fashion_mnist_labels_line_up():
    cfg = DatasetConfig(name="fashion_mnist", root=str(DEBIAN_FASHION_MNIST), download=False, max_images=1000)
    check_labels_available(cfg)
    images, labels = load_images(cfg), load_labels(cfg)
    assert len(labels.indices) == len(images) == 1000
    assert labels.names[0] == "T-shirt/top" and labels.names[7] == "Sneaker" and len(labels.names) == 10
    assert sum(labels.counts()) == 1000 and min(labels.counts()) > 50
    means = class_means(images, labels)
    # Sandals (straps) hold the least ink, pullovers or coats (long sleeves) the most.
    assert labels.names[min(range(10), key=means.__getitem__)] == "Sandal"
    assert labels.names[max(range(10), key=means.__getitem__)] in ("Pullover", "Coat")


# --------------------------------------------------------------------------------------------
# Image folders: first-level sub-folders are the classes

COLOURS = {"cat": (220, 30, 30), "dog": (30, 220, 30), "fox": (30, 30, 220)}


def save(path: Path, colour, format: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path, format)


@pytest.fixture
def class_folder(tmp_path) -> Path:
    """cat/ (2 images), dog/ (3 images, one in a nested folder, plus a corrupt JPEG), fox/ (2 images)."""
    root = tmp_path / "animals"
    for name, count in (("cat", 2), ("dog", 2), ("fox", 2)):
        for index in range(count):
            save(root / name / f"{index}.png", COLOURS[name])
    save(root / "dog" / "puppies" / "small.jpg", COLOURS["dog"], "JPEG")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG")
    (root / "fox" / "notes.txt").write_text("not an image")
    return root


def folder_cfg(root: Path, **overrides) -> DatasetConfig:
    return DatasetConfig(**{**dict(name="folder", root=str(root), image_size=8, channels=3), **overrides})


def assert_colours_match(images: torch.Tensor, labels: Labels) -> None:
    for image, index in zip(images, labels.indices.tolist(), strict=True):
        colour = torch.tensor(COLOURS[labels.names[index]], dtype=torch.float32)
        assert (image[:, 4, 4].float() - colour).abs().max() < 12, (labels.names[index], image[:, 4, 4])


@pytest.mark.parametrize("images_first", [True, False])
def test_folder_classes_line_up_past_a_skipped_corrupt_file(class_folder, images_first):
    cfg = folder_cfg(class_folder)
    check_labels_available(cfg)
    if images_first:
        images, labels = load_images(cfg), load_labels(cfg)
    else:  # the labels decode the images (to learn which files are skipped); the images then come from the cache
        labels, images = load_labels(cfg), load_images(cfg)
    assert labels.names == ("cat", "dog", "fox")
    assert len(images) == len(labels.indices) == 7  # 8 image files, broken.jpg skipped
    assert labels.counts() == [2, 3, 2]
    assert_colours_match(images, labels)
    assert labels.describe() == "3 classes: cat (2), dog (3), fox (2)"


def test_folder_labels_from_the_cache_without_decoding(class_folder, monkeypatch):
    cfg = folder_cfg(class_folder, max_images=5)
    images = load_images(cfg)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(data, "_decode_image", no_decoding)
    labels = load_labels(cfg)
    # The first 5 files in path order: cat/0, cat/1, dog/0, dog/1, dog/broken.jpg (skipped); classes still all three.
    assert labels.names == ("cat", "dog", "fox") and labels.counts() == [2, 2, 0]
    assert_colours_match(images, labels)


def test_a_cache_without_its_kept_file_is_decoded_again(class_folder, tmp_path):
    cfg = folder_cfg(class_folder, cache_dir=str(tmp_path / "cache"))
    load_images(cfg)
    (kept,) = (tmp_path / "cache").glob("*.kept")
    kept.unlink()  # as a cache written before .kept files existed
    labels, images = load_labels(cfg), load_images(cfg)
    assert kept.is_file() and len(labels.indices) == len(images) == 7
    assert_colours_match(images, labels)


@pytest.mark.parametrize(
    "layout, message",
    [
        (["a.png", "b.png"], "has no classes: conditional=true needs one sub-folder of images per class"),
        (["cat/a.png", "dog/b.png", "loose.png"], "has 1 images outside any class sub-folder \\(loose.png\\)"),
        (["cat/a.png", "cat/deeper/b.png"], "has one class, cat/: conditional=true needs at least 2 classes"),
    ],
)
def test_folder_without_classes_is_refused_saying_how_to_lay_it_out(tmp_path, layout, message):
    for name in layout:
        save(tmp_path / name, (1, 2, 3))
    for call in (check_labels_available, load_labels):
        with pytest.raises(UserError, match=message) as caught:
            call(folder_cfg(tmp_path))
        assert f"dataset.name=folder at {tmp_path.resolve()}" in str(caught.value)
        assert str(caught.value).endswith("or train with conditional=false")


# --------------------------------------------------------------------------------------------
# CelebA attributes

ATTRIBUTE_NAMES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones "
    "Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young"
).split()
# (Smiling, Male) of the fake faces 000001.jpg..000010.jpg; the red channel shows Smiling, the green Male.
FACES = [(1, 1), (1, 0), (0, 1), (0, 0), (1, 1), (0, 0), (0, 0), (1, 0), (0, 1), (0, 0)]


def face_colour(smiling: int, male: int) -> tuple:
    return (200 if smiling else 40, 200 if male else 40, 120)


@pytest.fixture(scope="module")
def faces() -> Dict[str, bytes]:
    jpegs = {}
    for index, (smiling, male) in enumerate(FACES, start=1):
        buffer = io.BytesIO()
        Image.new("RGB", (178, 218), face_colour(smiling, male)).save(buffer, "JPEG", quality=90)
        jpegs[f"{index:06d}.jpg"] = buffer.getvalue()
    return jpegs


def attribute_table(faces: Dict[str, bytes], count: int = 0) -> str:
    """list_attr_celeba.txt as CelebA ships it: the count, the names, then one row of 1/-1 per image."""
    rows = []
    for name, (smiling, male) in zip(faces, FACES, strict=True):
        values = {"Smiling": smiling, "Male": male, "Young": 1}
        rows.append(name + " " + " ".join(f"{1 if values.get(a) else -1:2d}" for a in ATTRIBUTE_NAMES))
    return "\n".join([str(count or len(rows)), " ".join(ATTRIBUTE_NAMES) + " ", *rows]) + "\n"


def write_celeba(root: Path, faces: Dict[str, bytes], zipped: bool = False) -> Path:
    """torchvision's layout (root/celeba/img_align_celeba/ or the zip beside it), the attribute table beside it."""
    folder = root / "celeba"
    folder.mkdir(parents=True, exist_ok=True)
    if zipped:
        with zipfile.ZipFile(folder / "img_align_celeba.zip", "w") as archive:
            for name, content in faces.items():
                archive.writestr(f"img_align_celeba/{name}", content)
    else:
        (folder / "img_align_celeba").mkdir()
        for name, content in faces.items():
            (folder / "img_align_celeba" / name).write_bytes(content)
    (folder / "list_attr_celeba.txt").write_text(attribute_table(faces))
    return folder


def celeba_cfg(root: Path, **overrides) -> DatasetConfig:
    settings = dict(name="celeba", root=str(root), image_size=16, channels=3, download=False, split="all")
    return DatasetConfig(**{**settings, "attributes": ["Smiling", "Male"], **overrides})


def expected_index(smiling: int, male: int) -> int:
    return (1 - smiling) * 2 + (1 - male)  # Smiling+Male, Smiling+no_Male, no_Smiling+Male, no_Smiling+no_Male


@pytest.mark.parametrize("zipped", [False, True])
def test_two_celeba_attributes_make_four_named_classes(tmp_path, faces, zipped):
    write_celeba(tmp_path, faces, zipped)
    cfg = celeba_cfg(tmp_path)
    check_labels_available(cfg)
    images, labels = load_images(cfg), load_labels(cfg)
    assert labels.names == ("Smiling+Male", "Smiling+no_Male", "no_Smiling+Male", "no_Smiling+no_Male")
    assert labels.indices.tolist() == [expected_index(*face) for face in FACES]
    assert labels.counts() == [2, 2, 2, 4]
    for image, (smiling, male) in zip(images, FACES, strict=True):  # the pixels agree with the class
        assert (image[0].float().mean() > 120) == bool(smiling) and (image[1].float().mean() > 120) == bool(male)


def test_celeba_labels_follow_split_max_images_and_skipped_files(tmp_path, faces):
    folder = write_celeba(tmp_path, faces)
    (folder / "img_align_celeba" / "000003.jpg").write_bytes(b"\xff\xd8 cut off")  # skipped when decoded
    partition = "".join(f"{name} {i % 2}\n" for i, name in enumerate(faces))  # odd-numbered files train
    (folder / "list_eval_partition.txt").write_text(partition)
    # Rows in another order than the files: each image's row is found by its name.
    lines = attribute_table(faces).splitlines()
    (folder / "list_attr_celeba.txt").write_text("\n".join(lines[:2] + lines[:1:-1]) + "\n")
    cfg = celeba_cfg(tmp_path, split="train", max_images=4)
    images, labels = load_images(cfg), load_labels(cfg)
    kept = [FACES[i] for i in (0, 4, 6)]  # the first 4 train images, 000001/3/5/7.jpg, less the unreadable 000003.jpg
    assert len(images) == 3 and labels.indices.tolist() == [expected_index(*face) for face in kept]


def test_one_attribute_makes_two_classes(tmp_path, faces):
    write_celeba(tmp_path, faces)
    labels = load_labels(celeba_cfg(tmp_path, attributes=["Male"]))
    assert labels.names == ("Male", "no_Male") and labels.counts() == [4, 6]


def test_class_names_survive_hydra_override_parsing():
    parser = OverridesParser.create()
    names = combination_names(["Smiling", "Male", "Young"])
    for index, name in enumerate(names):
        typed = parser.parse_override(f"class={name}").value()
        assert typed == name and class_index(names, typed) == index


def test_the_class_gan_train_suggests_sampling_reads_back_as_that_class():
    """The closing block's `gan-sample ... class=...` line, pasted into a shell, names the class it shows: by
    name where Hydra reads it unquoted, else by index (a folder named in another script, or with a comma)."""
    parser = OverridesParser.create()
    names = ("big cat", "狐", "chien ü", "a,b", "null", "T-shirt/top", "7")
    for index in range(len(names)):
        (word,) = shlex.split(class_argument(names, index))
        assert class_index(names, str(parser.parse_override(word).value())) == index, word


@pytest.mark.parametrize(
    "attributes, message",
    [
        ([], "dataset.name=celeba has no classes until you choose attributes: .*dataset.attributes=\\[Smiling,Male\\]"),
        (["smiling"], "CelebA has no attribute 'smiling' in dataset.attributes; did you mean Smiling\\?"),
        (["Male", "Smilng"], "no attribute 'Smilng' .*did you mean Smiling\\? All 40 names are on the second line of"),
    ],
)
def test_celeba_attributes_not_chosen_or_unknown(tmp_path, faces, attributes, message):
    write_celeba(tmp_path, faces)
    for call in (check_labels_available, load_labels):
        with pytest.raises(UserError, match=message):
            call(celeba_cfg(tmp_path, attributes=attributes))


def test_celeba_attribute_file_missing_or_damaged(tmp_path, faces):
    folder = write_celeba(tmp_path, faces)
    table = folder / "list_attr_celeba.txt"
    table.unlink()
    with pytest.raises(UserError, match="no list_attr_celeba.txt beside the CelebA images \\(looked in .*download it"):
        check_labels_available(celeba_cfg(tmp_path))
    table.write_text(attribute_table(faces, count=20))
    with pytest.raises(UserError, match="lists 10 images, but its first line says 20"):
        load_labels(celeba_cfg(tmp_path))
    lines = attribute_table(faces).splitlines()
    table.write_text("\n".join(["7", *lines[1:-3]]) + "\n")  # the last 3 images left out, the count agreeing
    with pytest.raises(UserError, match="3 CelebA images have no line in .*list_attr_celeba.txt \\(e.g. 000008.jpg\\)"):
        load_labels(celeba_cfg(tmp_path))
    table.write_text("not the attribute list\n")
    with pytest.raises(UserError, match="is not CelebA's attribute list"):
        check_labels_available(celeba_cfg(tmp_path))


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(name="mnist", attributes=["Smiling"]), "dataset.attributes=\\[Smiling\\] would have no effect: only"),
        (dict(name="celeba", attributes=["Male"] * 2), "names Male more than once"),
        (dict(name="celeba", attributes=ATTRIBUTE_NAMES[:6]), "has 6 attributes, more than the 5 allowed: k attr"),
    ],
)
def test_attribute_settings_checked_before_any_file(settings, message):
    with pytest.raises(UserError, match=message):
        validate_dataset(DatasetConfig(**settings))


# --------------------------------------------------------------------------------------------
# Class names typed by users; labels of data sets registered elsewhere

FASHION = FASHION_MNIST_CLASSES


@pytest.mark.parametrize(
    "typed, index",
    [("Sneaker", 7), ("ankle_boot", 9), ("ANKLE BOOT", 9), ("t-shirt", 0), ("tshirt/TOP", 0), ("3", 3), ("Bag", 8)],
)
def test_class_index_finds_what_users_type(typed, index):
    assert class_index(FASHION, typed) == index


@pytest.mark.parametrize(
    "typed, message",
    [
        ("snekaer", "no class 'snekaer'; did you mean Sneaker\\? classes: T-shirt/top, Trouser, .*, Ankle boot$"),
        ("10", "no class 10: the 10 classes are numbered 0..9"),
        ("s", "class 's' could be Sandal or Shirt or Sneaker; give the whole name"),
        ("xyzzy", "no class 'xyzzy'; classes: T-shirt/top"),
    ],
)
def test_class_index_refuses_what_it_cannot_place(typed, message):
    with pytest.raises(UserError, match=message):
        class_index(FASHION, typed)


def test_digits_name_classes_before_indices():
    names = ("10", "2", "7")
    assert class_index(names, "7") == 2 and class_index(names, "1") == 1


def test_a_negative_index_is_refused_not_read_as_the_digit_without_its_sign():
    with pytest.raises(UserError, match="no class -1: the 10 classes are numbered 0..9"):
        class_index(DIGIT_CLASSES, "-1")
    assert class_index(("-1", "1"), "-1") == 0  # a class that is named so


def test_describe_shortens_many_classes_and_bad_labels_are_bugs():
    labels = Labels(torch.arange(30) % 15, tuple(f"c{i}" for i in range(15)))
    shown = ", ".join(f"c{i} (2)" for i in range(10))
    assert labels.describe() == f"15 classes: {shown}, and 5 more (fewest: c0 (2))"
    with pytest.raises(ValueError, match="int64"):
        Labels(torch.zeros(3, dtype=torch.int32), ("a", "b"))
    with pytest.raises(ValueError, match="0..1"):
        Labels(torch.tensor([0, 2]), ("a", "b"))
    with pytest.raises(ValueError, match="distinct"):
        Labels(torch.tensor([0]), ("a",))


@pytest.fixture
def toy_data_sets():
    shape = (6, 1, 8, 8)
    data.dataset("toy_labelled")(lambda cfg: torch.full(shape, 3, dtype=torch.uint8))
    data.labels_of("toy_labelled")(lambda cfg: Labels(torch.tensor([0, 1, 0, 1, 1, 1]), ("even", "odd")))
    data.dataset("toy_plain")(lambda cfg: torch.full(shape, 3, dtype=torch.uint8))
    yield
    for name in ("toy_labelled", "toy_plain"):
        data.DATASETS.pop(name)


def test_labels_of_a_data_set_registered_elsewhere(toy_data_sets):
    labels = load_labels(DatasetConfig(name="toy_labelled", image_size=8, max_images=4))
    assert labels.indices.tolist() == [0, 1, 0, 1] and labels.names == ("even", "odd")
    check_labels_available(DatasetConfig(name="toy_labelled"))
    for call in (check_labels_available, load_labels):
        with pytest.raises(UserError, match="dataset.name=toy_plain has no class labels: .*mnist, fashion_mnist"):
            call(DatasetConfig(name="toy_plain", image_size=8))
