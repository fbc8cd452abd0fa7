"""Datasets as uint8 NHWC arrays in memory: scikit-learn digits and CIFAR-10 batches (image folders stream: feeds.py).

Images stay uint8 until they reach the device; normalisation happens inside the jitted step.
Batch order is a function of (seed, epoch) only, so a resumed run needs nothing but its step.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from resnet_data.folders import SPLIT_SEED, held_out

from .config import TrainConfig

CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
CIFAR10_SIDE = 32
# Label i of CIFAR-10 is CIFAR10_CLASSES[i] (the batches.meta file of the official release).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# digits pixels are 0..16; scaled to the uint8 range every other dataset uses.
DIGITS_MAX = 16
DIGITS_CLASSES = tuple(str(d) for d in range(10))
# Resized in-memory images may take this share of the machine's memory at most (the rest: the model,
# the compiler, the batches on their way to the device).
MEMORY_SHARE = 0.5


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
    class_names: tuple[str, ...]  # label i is class_names[i]


Split = tuple[np.ndarray, np.ndarray]  # (images NHWC uint8, labels)


def _check_splits(name: str, train: Split, test: Split) -> None:
    """Refuse, before any training, a split with no images (an empty test split divides by zero after an epoch)."""
    for split, (images, _) in (("training", train), ("test", test)):
        if len(images) == 0:
            sizes = f"{len(train[0])} training and {len(test[0])} test images"
            raise ValueError(f"{name}: the {split} split is empty ({sizes}); add images or change --test-fraction")


Stats = tuple[tuple[float, float, float], tuple[float, float, float]]


def channel_stats(images: np.ndarray) -> Stats:
    """Per-channel mean and std (a zero std read as 1) of uint8 NHWC images, in 0..1 units."""
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 0, std, 1.0)
    return (float(mean[0]), float(mean[1]), float(mean[2])), (float(std[0]), float(std[1]), float(std[2]))


def _finish(name: str, train: Split, test: Split, class_names: tuple[str, ...], stats: Stats | None = None) -> Dataset:
    """The dataset; its statistics are stats when given, else those of the training images."""
    _check_splits(name, train, test)
    mean, std = channel_stats(train[0]) if stats is None else stats
    return Dataset(
        name,
        np.ascontiguousarray(train[0], np.uint8),
        train[1].astype(np.int32),
        np.ascontiguousarray(test[0], np.uint8),
        test[1].astype(np.int32),
        len(class_names),
        mean,
        std,
        class_names,
    )


def _split(images: np.ndarray, labels: np.ndarray, test_fraction: float) -> tuple[Split, Split]:
    """A fixed, seeded, class-stratified held-out split."""
    test = held_out(labels, test_fraction)
    return (images[~test], labels[~test]), (images[test], labels[test])


def _resize(images_nhw3: np.ndarray, side: int) -> np.ndarray:
    if images_nhw3.shape[1:3] == (side, side):
        return images_nhw3
    bilinear = Image.Resampling.BILINEAR
    return np.stack([np.asarray(Image.fromarray(im).resize((side, side), bilinear)) for im in images_nhw3])


def _check_memory(name: str, count: int, side: int) -> None:
    """Refuse, before resizing, images that would take more than MEMORY_SHARE of this machine's memory."""
    need = count * side * side * 3
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > MEMORY_SHARE * total:
        raise ValueError(
            f"{name} at --image-size {side}: {count} images of {side}x{side}x3 would take {need / 2**30:.1f} GiB, "
            f"more than {MEMORY_SHARE:.0%} of this machine's {total / 2**30:.1f} GiB; "
            "lower --image-size or --train-limit"
        )


def load_digits(image_size: int, test_fraction: float, train_limit: int = 0) -> Dataset:
    """scikit-learn's 1,797 8x8 digits, upscaled (bilinear) to image_size, grey copied to 3 channels.

    Only the images used are resized: the held-out ones and the training ones train_limit keeps
    (limited()). The statistics are those of the whole training split at the source resolution.
    """
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    grey = np.round(d.images * (255.0 / DIGITS_MAX)).astype(np.uint8)
    (train, train_labels), (test, test_labels) = _split(np.repeat(grey[..., None], 3, axis=-1), d.target, test_fraction)
    stats = channel_stats(train) if len(train) else None
    keep = limited(len(train), train_limit)
    _check_memory("digits", len(keep) + len(test), image_size)
    resized = (_resize(train[keep], image_size), train_labels[keep]), (_resize(test, image_size), test_labels)
    return _finish("digits", *resized, DIGITS_CLASSES, stats)


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
    return _finish("cifar10", (images, labels), test, CIFAR10_CLASSES)


def limited(n: int, limit: int) -> np.ndarray:
    """Indices of the training items --train-limit keeps: a fixed, seeded subset in order (all when 0)."""
    if not limit or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(SPLIT_SEED).permutation(n)[:limit])


def load_dataset(config: TrainConfig) -> Dataset:
    """The in-memory dataset a config names (digits or cifar10), with --train-limit applied (before any resize);
    the statistics are those of the whole training split."""
    if config.dataset == "digits":
        return load_digits(config.image_size, config.test_fraction, config.train_limit)
    ds = load_cifar10(config.data_dir)
    keep = limited(len(ds.train_labels), config.train_limit)
    if len(keep) == len(ds.train_labels):
        return ds
    return dataclasses.replace(ds, train_images=ds.train_images[keep], train_labels=ds.train_labels[keep])


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the n training images in an epoch: a function of (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped, so every step has one shape)."""
    if n < batch_size:
        raise ValueError(f"batch size {batch_size} is larger than the {n} training images")
    return n // batch_size
