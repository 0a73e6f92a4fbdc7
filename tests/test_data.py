"""Tests of dcgan.data: every data set layout built for real on disk, the decode cache, and batching."""

from __future__ import annotations

import gzip
import io
import logging
import struct
import zipfile
from pathlib import Path
from typing import Dict
from urllib.error import URLError

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from dcgan import data
from dcgan.data import DatasetConfig, ImageBatches, describe, load_images
from dcgan.errors import UserError

from conftest import DEBIAN_FASHION_MNIST

CELEBA_COUNT = 20
# list_eval_partition.txt of the fake CelebA: 12 train, 4 valid, 4 test images.
CELEBA_PARTITION = {f"{i:06d}.jpg": 0 if i <= 12 else 1 if i <= 16 else 2 for i in range(1, CELEBA_COUNT + 1)}


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    with np.load(data.MNIST_TINY) as archive:
        return archive["images"]


def write_idx(path: Path, images: np.ndarray, magic: int = 0x803) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = struct.pack(">IIII", magic, *images.shape) + images.tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def celeba_color(index: int) -> tuple:
    """A colour that tells the fake CelebA images apart and shows their order."""
    return (index * 12, 255 - index * 12, (index * 37) % 256)


@pytest.fixture(scope="module")
def celeba_jpegs() -> Dict[str, bytes]:
    """20 aligned-CelebA-sized JPEGs (178x218), each a distinct colour with a gradient."""
    jpegs = {}
    ramp = np.linspace(0, 40, 178, dtype=np.float32)[None, :, None]
    for index in range(1, CELEBA_COUNT + 1):
        pixels = np.clip(np.full((218, 178, 3), celeba_color(index), np.float32) * 0.8 + ramp, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
        jpegs[f"{index:06d}.jpg"] = buffer.getvalue()
    return jpegs


def write_celeba_folder(folder: Path, jpegs: Dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in jpegs.items():
        (folder / name).write_bytes(content)


def write_celeba_zip(path: Path, jpegs: Dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in jpegs.items():
            archive.writestr(f"img_align_celeba/{name}", content)


def write_partition(path: Path) -> None:
    path.write_text("".join(f"{name} {split}\n" for name, split in CELEBA_PARTITION.items()))


def celeba_cfg(root: Path, **overrides) -> DatasetConfig:
    settings = dict(name="celeba", root=str(root), image_size=32, channels=3, download=False, split="all")
    return DatasetConfig(**{**settings, **overrides})


# --------------------------------------------------------------------------------------------
# mnist_tiny, MNIST and Fashion-MNIST


def test_mnist_tiny_is_the_bundled_digits(digits):
    images = load_images(DatasetConfig(name="mnist_tiny"))
    assert images.dtype == torch.uint8 and images.shape == (5000, 1, 28, 28)
    assert torch.equal(images[:, 0], torch.from_numpy(digits))


def test_mnist_tiny_resized_to_rgb_keeps_the_picture(digits):
    images = load_images(DatasetConfig(name="mnist_tiny", image_size=64, channels=3, max_images=10))
    assert images.dtype == torch.uint8 and images.shape == (10, 3, 64, 64)
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    # Upsampling keeps each digit's brightness and where it is, so the means agree closely.
    assert np.allclose(images[:, 0].float().mean(dim=(1, 2)).numpy(), digits[:10].mean(axis=(1, 2)), atol=1.5)
    assert images.max() > 200


@pytest.mark.parametrize(
    "name, relative",
    [
        ("mnist", "train-images-idx3-ubyte.gz"),
        ("mnist", "train-images-idx3-ubyte"),
        ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
        ("mnist", "MNIST/raw/train-images-idx3-ubyte.gz"),
        ("fashion_mnist", "FashionMNIST/raw/train-images-idx3-ubyte.gz"),
        ("fashion_mnist", "raw/train-images-idx3-ubyte"),
    ],
)
def test_idx_files_give_exactly_their_pixels(tmp_path, digits, name, relative):
    write_idx(tmp_path / relative, digits[:100])
    write_idx(tmp_path / relative.replace("train-", "t10k-"), digits[100:150])
    train = load_images(DatasetConfig(name=name, root=str(tmp_path), download=False))
    test = load_images(DatasetConfig(name=name, root=str(tmp_path), split="test", download=False))
    assert train.dtype == torch.uint8 and train.shape == (100, 1, 28, 28)
    assert np.array_equal(train[:, 0].numpy(), digits[:100])
    assert np.array_equal(test[:, 0].numpy(), digits[100:150])


def test_mnist_max_images_and_omegaconf_config(tmp_path, digits):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", digits[:100])
    cfg = OmegaConf.structured(DatasetConfig(name="mnist", root=str(tmp_path), max_images=7, download=False))
    images = load_images(cfg)
    assert np.array_equal(images[:, 0].numpy(), digits[:7])


def cut_gzip(path: Path, raw: bytes) -> None:
    path.unlink()
    path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw)[:-500])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda path, raw: path.write_bytes(raw[:-100]), "truncated or corrupt"),
        (lambda path, raw: path.write_bytes(raw[:10]), "too short"),
        (lambda path, raw: path.write_bytes(struct.pack(">I", 0x801) + raw[4:]), "not an IDX image file"),
        (cut_gzip, "cannot be read"),
    ],
)
def test_damaged_idx_file_is_a_user_error_naming_it(tmp_path, digits, damage, message):
    path = write_idx(tmp_path / "train-images-idx3-ubyte", digits[:50])
    damage(path, path.read_bytes())
    with pytest.raises(UserError, match=message) as caught:
        load_images(DatasetConfig(name="mnist", root=str(tmp_path), download=False))
    assert "train-images-idx3-ubyte" in str(caught.value)


def test_missing_mnist_without_download_explains_what_to_put_where(tmp_path):
    with pytest.raises(UserError, match="could not find or download MNIST under") as caught:
        load_images(DatasetConfig(name="mnist", root=str(tmp_path), download=False))
    assert str(tmp_path) in str(caught.value) and "train-images-idx3-ubyte.gz" in str(caught.value)


def test_failed_download_is_a_user_error(tmp_path, monkeypatch):
    import torchvision

    def offline(root, *args, **kwargs):
        (Path(root) / "FashionMNIST" / "raw").mkdir(parents=True)  # as torchvision does before downloading
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(UserError, match="could not find or download Fashion-MNIST .*name resolution"):
        load_images(DatasetConfig(name="fashion_mnist", root=str(tmp_path / "data"), download=True))
    assert not (tmp_path / "data").exists()  # a refused command makes no folder, torchvision's empty ones neither


def test_mnist_rejects_celeba_splits(tmp_path):
    with pytest.raises(UserError, match="split must be train or test"):
        load_images(DatasetConfig(name="mnist", root=str(tmp_path), split="valid"))


@pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(),
    reason="Debian's fashion-mnist package (/usr/share/datasets/fashion-mnist) is not installed",
)
def test_debian_fashion_mnist():
    train = load_images(DatasetConfig(name="fashion_mnist", root=str(DEBIAN_FASHION_MNIST), download=False))
    test = load_images(
        DatasetConfig(name="fashion_mnist", root=str(DEBIAN_FASHION_MNIST), split="test", download=False)
    )
    assert train.shape == (60000, 1, 28, 28) and train.dtype == torch.uint8
    assert test.shape == (10000, 1, 28, 28)
    # Fashion-MNIST's published training-set mean is 0.2860 of full scale.
    assert abs(train.float().mean().item() / 255 - 0.2860) < 0.001


# --------------------------------------------------------------------------------------------
# CelebA


@pytest.fixture()
def celeba_reference(tmp_path_factory, celeba_jpegs) -> torch.Tensor:
    root = tmp_path_factory.mktemp("celeba_reference")
    write_celeba_folder(root, celeba_jpegs)
    return load_images(celeba_cfg(root))


LAYOUTS = {
    "torchvision": lambda root, jpegs: write_celeba_folder(root / "celeba" / "img_align_celeba", jpegs),
    "plain root": lambda root, jpegs: write_celeba_folder(root, jpegs),
    "img_align_celeba": lambda root, jpegs: write_celeba_folder(root / "img_align_celeba", jpegs),
    "zip in root": lambda root, jpegs: write_celeba_zip(root / "img_align_celeba.zip", jpegs),
    "zip in celeba/": lambda root, jpegs: write_celeba_zip(root / "celeba" / "img_align_celeba.zip", jpegs),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_celeba_layout_gives_the_same_images(tmp_path, celeba_jpegs, celeba_reference, layout):
    LAYOUTS[layout](tmp_path, celeba_jpegs)
    images = load_images(celeba_cfg(tmp_path))
    assert images.dtype == torch.uint8 and images.shape == (CELEBA_COUNT, 3, 32, 32)
    assert torch.equal(images, celeba_reference)
    if layout.startswith("zip"):
        assert not list(tmp_path.rglob("*.jpg"))  # read in place, nothing extracted


def test_celeba_images_keep_their_order_and_colour(celeba_reference):
    red_means = celeba_reference[:, 0].float().mean(dim=(1, 2))
    expected = torch.tensor([celeba_color(i)[0] * 0.8 + 20 for i in range(1, CELEBA_COUNT + 1)])
    assert torch.allclose(red_means, expected, atol=4)


@pytest.mark.parametrize("layout", ["torchvision", "plain root", "zip in root", "zip in celeba/"])
@pytest.mark.parametrize(
    "split, members",
    [("train", range(1, 13)), ("valid", range(13, 17)), ("test", range(17, 21)), ("all", range(1, 21))],
)
def test_celeba_partition_file_selects_the_split(tmp_path, celeba_jpegs, celeba_reference, layout, split, members):
    LAYOUTS[layout](tmp_path, celeba_jpegs)
    partition_folder = tmp_path / "celeba" if layout in ("torchvision", "zip in celeba/") else tmp_path
    write_partition(partition_folder / "list_eval_partition.txt")
    images = load_images(celeba_cfg(tmp_path, split=split))
    assert torch.equal(images, celeba_reference[[i - 1 for i in members]])


def test_celeba_without_partition_file_uses_every_image(tmp_path, celeba_jpegs):
    write_celeba_folder(tmp_path, celeba_jpegs)
    assert len(load_images(celeba_cfg(tmp_path, split="test"))) == CELEBA_COUNT


def test_celeba_max_images_keeps_the_first(tmp_path, celeba_jpegs, celeba_reference):
    write_celeba_zip(tmp_path / "img_align_celeba.zip", celeba_jpegs)
    assert torch.equal(load_images(celeba_cfg(tmp_path, max_images=5)), celeba_reference[:5])


def test_celeba_gray_and_size(tmp_path, celeba_jpegs):
    write_celeba_folder(tmp_path, celeba_jpegs)
    images = load_images(celeba_cfg(tmp_path, channels=1, image_size=64, crop=108))
    assert images.shape == (CELEBA_COUNT, 1, 64, 64) and images.dtype == torch.uint8


QUOTA_PAGE = (
    "<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head>"
    "<body>Too many users have viewed or downloaded this file recently.</body></html>"
)


@pytest.mark.parametrize(
    "relative, content",
    [
        ("img_align_celeba.zip", QUOTA_PAGE),
        ("celeba/img_align_celeba.zip", QUOTA_PAGE),
        (
            "img_align_celeba.zip",
            "\n  <html><body>Sorry, you can't view or download this file at this time.</body></html>",
        ),
        ("img_align_celeba.zip", "Download quota exceeded for this file, so you can't download it at this time."),
    ],
)
def test_google_drive_quota_page_saved_as_the_zip(tmp_path, relative, content):
    page = tmp_path / relative
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(content)
    with pytest.raises(
        UserError, match="is a Google Drive web page \\(download quota exceeded\\), not the data: delete it"
    ) as caught:
        load_images(celeba_cfg(tmp_path))
    assert str(page) in str(caught.value)


def test_a_zip_that_is_neither_zip_nor_web_page(tmp_path):
    (tmp_path / "img_align_celeba.zip").write_bytes(b"PK\x03\x04 cut off")
    with pytest.raises(UserError, match="is not a zip file"):
        load_images(celeba_cfg(tmp_path))


def test_missing_celeba_says_what_to_download_where_and_what_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no CelebA images under") as caught:
        load_images(celeba_cfg(Path("nowhere")))  # a relative root is shown as the absolute path it means
    message = str(caught.value)
    where = tmp_path.resolve() / "nowhere"
    assert "img_align_celeba.zip (1.4 GB" in message and "list_eval_partition.txt (2.8 MB" in message
    assert "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html" in message and f"put both in {where}/celeba/" in message
    assert message.endswith(f"then run: gan-train dataset=celeba dataset.root={where}")
    assert "\n" not in message


def test_missing_celeba_tries_torchvision_when_download_is_on(tmp_path, monkeypatch):
    import torchvision

    calls = []

    def failing_download(root, split, download):
        calls.append((root, split, download))
        raise RuntimeError("The daily quota of the file img_align_celeba.zip is exceeded")

    monkeypatch.setattr(torchvision.datasets, "CelebA", failing_download)
    with pytest.raises(UserError, match="no CelebA images under .* \\(the automatic download failed: The daily quota"):
        load_images(celeba_cfg(tmp_path, download=True))
    assert calls == [(str(tmp_path), "all", True)]


# --------------------------------------------------------------------------------------------
# Image folders


def save(path: Path, image: Image.Image, format: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format)


@pytest.fixture()
def mixed_folder(tmp_path) -> Path:
    """8x8 images in many Pillow modes, in nested folders, plus files that must be ignored."""
    root = tmp_path / "mixed"
    save(root / "a" / "gray.png", Image.new("L", (8, 8), 200))
    save(root / "a" / "b" / "rgb.png", Image.new("RGB", (8, 8), (10, 20, 30)))
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (255, 0, 0, 0)  # fully transparent red: black once composited
    rgba[:, 4:] = (0, 255, 0, 255)
    save(root / "rgba.png", Image.fromarray(rgba, "RGBA"))
    save(root / "palette.png", Image.new("RGB", (8, 8), (0, 0, 255)).convert("P"))
    save(root / "sixteen.png", Image.fromarray(np.full((8, 8), 32896, np.uint16)))
    save(root / "LA.PNG", Image.new("LA", (8, 8), (100, 255)))
    save(root / "cmyk.tif", Image.new("CMYK", (8, 8), (0, 255, 0, 0)), "TIFF")
    (root / "notes.txt").write_text("not an image")
    save(root / ".hidden" / "ignored.png", Image.new("L", (8, 8), 1))
    return root


# The mixed folder's images in sorted path order, as RGB colours.
MIXED_RGB = {
    "LA.PNG": [(100, 100, 100)],
    "a/b/rgb.png": [(10, 20, 30)],
    "a/gray.png": [(200, 200, 200)],
    "cmyk.tif": [(255, 0, 255)],
    "palette.png": [(0, 0, 255)],
    "rgba.png": [(0, 0, 0), (0, 255, 0)],  # left half, right half
    "sixteen.png": [(128, 128, 128)],
}


def test_folder_converts_every_mode(mixed_folder):
    images = load_images(DatasetConfig(name="folder", root=str(mixed_folder), image_size=8, channels=3))
    assert images.shape == (len(MIXED_RGB), 3, 8, 8) and images.dtype == torch.uint8
    for image, (name, colours) in zip(images, MIXED_RGB.items(), strict=False):
        halves = [image[:, :, :4], image[:, :, 4:]] if len(colours) == 2 else [image]
        for half, colour in zip(halves, colours, strict=False):
            assert torch.equal(half, torch.tensor(colour, dtype=torch.uint8)[:, None, None].expand_as(half)), name


def test_folder_grayscale(mixed_folder):
    images = load_images(DatasetConfig(name="folder", root=str(mixed_folder), image_size=8, channels=1))
    assert images.shape == (len(MIXED_RGB), 1, 8, 8)
    gray = dict(zip(MIXED_RGB, images[:, 0, 0, 0].tolist(), strict=False))
    assert gray["a/gray.png"] == 200 and gray["sixteen.png"] == 128 and gray["LA.PNG"] == 100


def test_center_crop_then_resize(tmp_path):
    # A white 108x108 square in the middle of a black 178x218 picture.
    pixels = np.zeros((218, 178), np.uint8)
    pixels[55:163, 35:143] = 255
    save(tmp_path / "face.png", Image.fromarray(pixels))
    cropped = load_images(DatasetConfig(name="folder", root=str(tmp_path), image_size=16, crop=108))
    whole = load_images(
        DatasetConfig(name="folder", root=str(tmp_path), image_size=16, crop=0, cache_dir=str(tmp_path / "other"))
    )
    assert cropped.shape == whole.shape == (1, 1, 16, 16)
    assert cropped.min() >= 250  # only the white square is left
    assert whole[0, 0, 0, 0] < 5 and whole[0, 0, 8, 8] > 250  # the largest square still has black edges


@pytest.fixture()
def folder_with_bad_files(tmp_path) -> Path:
    root = tmp_path / "photos"
    for index in range(3):
        save(root / "good" / f"{index}.png", Image.new("RGB", (20, 30), (index * 50, 0, 0)))
    (root / "zero.jpg").write_bytes(b"")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buffer, "PNG")
    (root / "corrupt.png").write_bytes(buffer.getvalue()[:60])
    return root


def test_bad_files_are_skipped_with_one_warning_naming_them(folder_with_bad_files, caplog):
    with caplog.at_level(logging.WARNING, logger="dcgan.data"):
        images = load_images(DatasetConfig(name="folder", root=str(folder_with_bad_files), image_size=16, channels=3))
    assert images.shape == (3, 3, 16, 16)
    assert images[:, 0, 8, 8].tolist() == [0, 50, 100]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "zero.jpg" in warnings[0] and "corrupt.png" in warnings[0]


def test_bad_files_are_an_error_when_asked(folder_with_bad_files, own_cache):
    cfg = DatasetConfig(name="folder", root=str(folder_with_bad_files), image_size=16, on_bad_file="error")
    with pytest.raises(UserError, match="2 image files in .* cannot be read: corrupt.png, zero.jpg"):
        load_images(cfg)
    # The failed decode left no cache behind, half-written or otherwise.
    assert not list(own_cache.iterdir())


def test_many_bad_files_are_listed_briefly(tmp_path, caplog):
    save(tmp_path / "ok.png", Image.new("L", (8, 8), 5))
    for index in range(13):
        (tmp_path / f"bad{index:02d}.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="dcgan.data"):
        assert len(load_images(DatasetConfig(name="folder", root=str(tmp_path), image_size=8))) == 1
    assert "bad09.jpg and 3 more" in caplog.text and "bad10.jpg" not in caplog.text


def test_folder_of_only_bad_files(tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="no images found in .*unreadable"):
        load_images(DatasetConfig(name="folder", root=str(tmp_path)))


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "readme.txt").write_text("no pictures here")
    with pytest.raises(UserError, match="no images found in"):
        load_images(DatasetConfig(name="folder", root=str(tmp_path)))
    with pytest.raises(UserError, match="is not a folder"):
        load_images(DatasetConfig(name="folder", root=str(tmp_path / "missing")))


def test_folder_max_images(mixed_folder):
    images = load_images(DatasetConfig(name="folder", root=str(mixed_folder), image_size=8, channels=3, max_images=2))
    assert images.shape == (2, 3, 8, 8)
    assert images[1, :, 0, 0].tolist() == list(MIXED_RGB["a/b/rgb.png"][0])


# --------------------------------------------------------------------------------------------
# The decode cache


@pytest.fixture
def own_cache(tmp_path_factory, monkeypatch) -> Path:
    """This test's own user cache folder ($XDG_CACHE_HOME); returns where decoded images go in it."""
    home = tmp_path_factory.mktemp("xdg-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home / "dcgan" / "decoded"


def test_second_load_reads_the_cache_without_decoding(tmp_path, celeba_jpegs, monkeypatch, own_cache):
    write_celeba_folder(tmp_path, celeba_jpegs)
    first = load_images(celeba_cfg(tmp_path))
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".jpg")] == []  # the data folder is untouched
    # The images, and which files they are (for labels); no temporary files left over.
    assert sorted(p.suffix for p in own_cache.iterdir()) == [".kept", ".npy"]

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(data, "_decode_image", no_decoding)
    assert torch.equal(load_images(celeba_cfg(tmp_path)), first)
    # Other settings make other pixels, so they need their own decode (which here fails).
    for other in (dict(crop=100), dict(image_size=16), dict(max_images=3)):
        with pytest.raises(UserError, match="unreadable"):
            load_images(celeba_cfg(tmp_path, **other))


def test_changed_files_invalidate_the_cache(tmp_path, celeba_jpegs, own_cache):
    write_celeba_folder(tmp_path, celeba_jpegs)
    assert len(load_images(celeba_cfg(tmp_path))) == CELEBA_COUNT
    (tmp_path / "000099.jpg").write_bytes(celeba_jpegs["000001.jpg"])
    assert len(load_images(celeba_cfg(tmp_path))) == CELEBA_COUNT + 1
    assert len(list(own_cache.glob("*.npy"))) == 2


def test_copies_of_one_data_set_have_their_own_caches(tmp_path, celeba_jpegs, own_cache):
    """The cache is keyed by where the data is, too: a copy elsewhere is decoded into a file of its own."""
    for copy in ("a", "b"):
        write_celeba_folder(tmp_path / copy, celeba_jpegs)
        load_images(celeba_cfg(tmp_path / copy))
    assert len(list(own_cache.glob("*.npy"))) == 2


def test_cache_dir_setting(tmp_path, celeba_jpegs, own_cache):
    write_celeba_zip(tmp_path / "data" / "img_align_celeba.zip", celeba_jpegs)
    load_images(celeba_cfg(tmp_path / "data", cache_dir=str(tmp_path / "cache")))
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    assert not own_cache.exists()
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["img_align_celeba.zip"]


def test_worker_pool_decodes_the_same_pixels(tmp_path, celeba_jpegs, celeba_reference, monkeypatch):
    write_celeba_zip(tmp_path / "img_align_celeba.zip", celeba_jpegs)
    monkeypatch.setattr(data, "POOL_MIN_FILES", 1)
    assert torch.equal(load_images(celeba_cfg(tmp_path, num_workers=2)), celeba_reference)


def test_describe():
    cfg = DatasetConfig(name="mnist", root="data/MNIST", split="test")
    assert describe(cfg, 10000) == "mnist (test, 10000 images, 28x28x1) from data/MNIST"
    assert "28x28x1" in describe(DatasetConfig(name="mnist_tiny"))


# --------------------------------------------------------------------------------------------
# ImageBatches


def numbered_images(count: int) -> torch.Tensor:
    """Image i is filled with the value i, so a batch tells which images it holds."""
    return torch.arange(count, dtype=torch.uint8)[:, None, None, None].expand(count, 1, 2, 2).contiguous()


def indices_of(batch: torch.Tensor) -> list:
    return torch.round((batch[:, 0, 0, 0] + 1) * 127.5).long().tolist()


def test_batches_are_float_in_range_with_the_right_shape():
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    images[0, 0, 0, 0], images[1, 0, 0, 0] = 0, 255
    batches = ImageBatches(images, batch_size=40, device=torch.device("cpu"), seed=0)
    batch = batches.next()[0]
    assert batch.dtype == torch.float32 and batch.shape == (40, 3, 8, 8) and batch.device.type == "cpu"
    assert batch.min() == -1 and batch.max() == 1
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))  # epoch 0 of seed 0, in its own order
    assert torch.allclose(batch, images[order].float() / 127.5 - 1)


def test_every_image_once_per_epoch_and_epochs_differ():
    batches = ImageBatches(numbered_images(48), batch_size=8, device=torch.device("cpu"), seed=3)
    assert batches.batches_per_epoch == 6
    epochs = []
    for _ in range(3):
        assert batches.position == 0
        seen = [index for _ in range(6) for index in indices_of(batches.next()[0])]
        assert sorted(seen) == list(range(48))
        epochs.append(seen)
    assert batches.epoch == 3
    assert epochs[0] != epochs[1] != epochs[2]


def test_incomplete_last_batch_is_dropped():
    batches = ImageBatches(numbered_images(50), batch_size=8, device=torch.device("cpu"), seed=0)
    assert batches.batches_per_epoch == 6
    seen = [index for _ in range(6) for index in indices_of(batches.next()[0])]
    assert len(set(seen)) == 48
    assert (batches.epoch, batches.position) == (1, 0)


def test_same_seed_same_batches_other_seed_other_batches():
    def draw(seed: int) -> list:
        batches = ImageBatches(numbered_images(48), batch_size=8, device=torch.device("cpu"), seed=seed)
        return [indices_of(batches.next()[0]) for _ in range(9)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_resuming_from_state_dict_continues_exactly():
    images = numbered_images(50)
    uninterrupted = ImageBatches(images, batch_size=8, device=torch.device("cpu"), seed=7)
    expected = [indices_of(uninterrupted.next()[0]) for _ in range(17)]

    first = ImageBatches(images, batch_size=8, device=torch.device("cpu"), seed=7)
    for _ in range(8):  # into the second epoch
        first.next()
    state = first.state_dict()
    assert state == {"epoch": 1, "position": 2, "batch_size": 8} and all(type(v) is int for v in state.values())
    resumed = ImageBatches(images, batch_size=8, device=torch.device("cpu"), seed=7)
    resumed.load_state_dict(state)
    assert [indices_of(resumed.next()[0]) for _ in range(9)] == expected[8:]


def test_damaged_state_is_a_user_error():
    batches = ImageBatches(numbered_images(16), batch_size=8, device=torch.device("cpu"), seed=0)
    with pytest.raises(UserError, match="data position"):
        batches.load_state_dict({"epoch": 1})


def test_two_ranks_split_each_epoch_between_them():
    images = numbered_images(48)
    ranks = [
        ImageBatches(images, batch_size=4, device=torch.device("cpu"), seed=5, rank=r, world_size=2) for r in range(2)
    ]
    assert [r.batches_per_epoch for r in ranks] == [6, 6]
    for _ in range(2):
        seen = [set(i for _ in range(6) for i in indices_of(rank.next()[0])) for rank in ranks]
        assert len(seen[0]) == len(seen[1]) == 24
        assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(48))


def test_fewer_images_than_a_batch():
    with pytest.raises(UserError, match="data set has 10 images, fewer than one batch of 16; lower trainer.batch_size"):
        ImageBatches(numbered_images(10), batch_size=16, device=torch.device("cpu"), seed=0)
    with pytest.raises(UserError, match="per process"):
        ImageBatches(numbered_images(20), batch_size=16, device=torch.device("cpu"), seed=0, world_size=2)


def test_user_cache_follows_xdg_cache_home(monkeypatch, tmp_path):
    """Caches (decoded images, reference features) go where $XDG_CACHE_HOME says, so jobs and tests can isolate them."""
    from dcgan.data import user_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert user_cache_dir() == tmp_path / "dcgan"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert user_cache_dir() == Path.home() / ".cache" / "dcgan"
