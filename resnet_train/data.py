"""Datasets as uint8 NHWC arrays in memory: scikit-learn digits, CIFAR-10 batches, an image folder.

Images stay uint8 until they reach the device; normalisation happens inside the jitted step.
Batch order is a function of (seed, epoch) only, so a resumed run needs nothing but its step.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from .config import TrainConfig

CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
CIFAR10_SIDE = 32
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Splits an image folder may already have; without them a seeded held-out split is drawn.
TRAIN_SPLIT, TEST_SPLITS = "train", ("test", "val")
# digits pixels are 0..16; scaled to the uint8 range every other dataset uses.
DIGITS_MAX = 16
# Seed of the held-out split: fixed, so every run of every config tests on the same images.
SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and test images (N, H, W, 3) uint8 with int32 labels, and per-channel statistics."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: tuple[float, float, float]  # of the training images, in 0..1 units
    std: tuple[float, float, float]


Split = tuple[np.ndarray, np.ndarray]  # (images NHWC uint8, labels)


def _check_splits(name: str, train: Split, test: Split) -> None:
    """Refuse, before any training, a split with no images (an empty test split divides by zero after an epoch)."""
    for split, (images, _) in (("training", train), ("test", test)):
        if len(images) == 0:
            sizes = f"{len(train[0])} training and {len(test[0])} test images"
            raise ValueError(f"{name}: the {split} split is empty ({sizes}); add images or change --test-fraction")


def _finish(name: str, train: Split, test: Split, num_classes: int) -> Dataset:
    _check_splits(name, train, test)
    x = train[0].reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 0, std, 1.0)
    return Dataset(
        name,
        np.ascontiguousarray(train[0], np.uint8),
        train[1].astype(np.int32),
        np.ascontiguousarray(test[0], np.uint8),
        test[1].astype(np.int32),
        num_classes,
        tuple(float(v) for v in mean),
        tuple(float(v) for v in std),
    )


def _split(images: np.ndarray, labels: np.ndarray, test_fraction: float) -> tuple[Split, Split]:
    """A fixed, seeded, class-stratified held-out split."""
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test[idx[: int(round(len(idx) * test_fraction))]] = True
    return (images[~test], labels[~test]), (images[test], labels[test])


def _resize(images_nhw3: np.ndarray, side: int) -> np.ndarray:
    if images_nhw3.shape[1:3] == (side, side):
        return images_nhw3
    return np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.BILINEAR)) for im in images_nhw3])


def load_digits(image_size: int, test_fraction: float) -> Dataset:
    """scikit-learn's 1,797 8x8 digits, upscaled (bilinear) to image_size, grey copied to 3 channels."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    grey = np.round(d.images * (255.0 / DIGITS_MAX)).astype(np.uint8)
    images = _resize(np.repeat(grey[..., None], 3, axis=-1), image_size)
    return _finish("digits", *_split(images, d.target, test_fraction), num_classes=10)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays, lists and dicts only: a pickle can run code, these batches need not."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: a CIFAR-10 batch holds only arrays and lists")
        return super().find_class(module, name)


def _cifar_pixels(data: np.ndarray, path: Path) -> np.ndarray:
    """The batch's pixels as uint8, refusing values a cast would wrap (above 255, negative, fractional)."""
    if data.dtype == np.uint8:
        return data
    if not np.issubdtype(data.dtype, np.integer):
        raise ValueError(f"{path}: expected integer pixel values 0..255, got dtype {data.dtype}")
    if data.min() < 0 or data.max() > 255:
        raise ValueError(f"{path}: pixel values must be 0..255, found {data.min()}..{data.max()}")
    return data.astype(np.uint8)


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    expected = f"{', '.join(CIFAR10_TRAIN)} and {CIFAR10_TEST}"
    if path.is_dir():
        raise ValueError(f"{path}: a folder; a CIFAR-10 folder holds the batch files {expected}")
    try:
        raw = _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; a CIFAR-10 folder holds {expected}") from None
    except EOFError:
        raise ValueError(f"{path}: empty or truncated; expected a CIFAR-10 python batch") from None
    except (pickle.UnpicklingError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict with b'data' and b'labels', got {type(raw).__name__}")
    data, labels = raw.get(b"data", raw.get("data")), raw.get(b"labels", raw.get("labels"))
    side = CIFAR10_SIDE
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * side * side or labels is None:
        got = getattr(data, "shape", type(data).__name__)
        raise ValueError(f"{path}: expected b'data' of shape (N, {3 * side * side}) and b'labels', got data {got}")
    if len(data) == 0:
        raise ValueError(f"{path}: the batch holds no images")
    labels = np.asarray(labels, np.int64)
    if labels.shape != (len(data),) or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: expected {len(data)} labels in 0..9, got shape {labels.shape}")
    # Rows are 1024 red, 1024 green, 1024 blue values (channel-major); the model wants NHWC.
    images = _cifar_pixels(data, path).reshape(-1, 3, side, side).transpose(0, 2, 3, 1)
    return images, labels


def load_cifar10(data_dir: str | Path) -> Dataset:
    """The official CIFAR-10 python batches: data_batch_1..5 for training, test_batch for testing."""
    root = Path(data_dir)
    train = [_cifar_batch(root / name) for name in CIFAR10_TRAIN]
    test = _cifar_batch(root / CIFAR10_TEST)
    images = np.concatenate([b[0] for b in train])
    labels = np.concatenate([b[1] for b in train])
    return _finish("cifar10", (images, labels), test, num_classes=10)


def _read_classes(root: Path, classes: list[str], side: int) -> Split:
    images, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        for path in files:
            try:
                with Image.open(path) as im:
                    images.append(np.asarray(im.convert("RGB").resize((side, side), Image.BILINEAR)))
            except OSError as e:
                raise ValueError(f"{path}: cannot read image ({e})") from None
            labels.append(label)
    if not images:
        raise ValueError(f"{root}: no {'/'.join(IMAGE_SUFFIXES)} images in {', '.join(classes)}")
    return np.stack(images), np.asarray(labels)


def _class_folders(root: Path) -> list[str]:
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder; expected one subfolder of images per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{root}: expected one subfolder per class (at least 2), found {classes}")
    return classes


def load_imagefolder(data_dir: str | Path, image_size: int, test_fraction: float) -> Dataset:
    """One subfolder per class of JPEG/PNG files, resized with PIL; uses train/ and test/ (or val/) if present."""
    root = Path(data_dir)
    test_root = next((root / s for s in TEST_SPLITS if (root / s).is_dir()), None)
    if (root / TRAIN_SPLIT).is_dir() and test_root is not None:
        classes = _class_folders(root / TRAIN_SPLIT)
        train = _read_classes(root / TRAIN_SPLIT, classes, image_size)
        test = _read_classes(test_root, classes, image_size)
    else:
        classes = _class_folders(root)
        train, test = _split(*_read_classes(root, classes, image_size), test_fraction)
    return _finish("imagefolder", train, test, num_classes=len(classes))


def load_dataset(config: TrainConfig) -> Dataset:
    """The dataset a config names, with --train-limit applied (a seeded subset)."""
    if config.dataset == "digits":
        ds = load_digits(config.image_size, config.test_fraction)
    elif config.dataset == "cifar10":
        ds = load_cifar10(config.data_dir)
    else:
        ds = load_imagefolder(config.data_dir, config.image_size, config.test_fraction)
    if config.train_limit and config.train_limit < len(ds.train_labels):
        keep = np.sort(np.random.default_rng(SPLIT_SEED).permutation(len(ds.train_labels))[: config.train_limit])
        ds = dataclasses.replace(ds, train_images=ds.train_images[keep], train_labels=ds.train_labels[keep])
    return ds


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the n training images in an epoch: a function of (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped, so every step has one shape)."""
    if n < batch_size:
        raise ValueError(f"batch size {batch_size} is larger than the {n} training images")
    return n // batch_size
