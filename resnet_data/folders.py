"""An image folder as compact file lists: one subfolder per class, hidden entries skipped, empty classes refused."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Splits a folder may already have; without a held-out one a seeded, stratified split is drawn.
TRAIN_SPLIT, TEST_SPLITS = "train", ("val", "test")
# Seed of the held-out split: fixed, so every run of every config tests on the same images.
SPLIT_SEED = 0
# The files a run trains and tests on, recorded in its run directory: a resume keeps them whatever
# was added to the folder since.
SPLIT_FILE = "split.json"


@dataclasses.dataclass(frozen=True)
class FileList:
    """Images under one root: paths relative to it and int32 labels, indexable as (path, label).

    Paths are one fixed-width bytes array, so the list of an ImageNet-sized folder (1.28M files)
    is a few tens of MB and pickles into every worker process as one buffer.
    """

    root: str
    names: np.ndarray  # (N,) bytes: path relative to root, os.fsencode'd
    labels: np.ndarray  # (N,) int32

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return os.path.join(self.root, os.fsdecode(self.names[index])), int(self.labels[index])

    def subset(self, keep: np.ndarray) -> FileList:
        """The files a boolean mask or an index array selects, in order."""
        return FileList(self.root, self.names[keep], self.labels[keep])


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """A folder's training and held-out files and its class names (label i is class_names[i])."""

    train: FileList
    test: FileList
    class_names: tuple[str, ...]


def _visible(name: str) -> bool:
    """Hidden entries (.ipynb_checkpoints, .DS_Store, ._x.jpg) are no classes and no images."""
    return not name.startswith(".")


def _subfolders(root: Path) -> list[str]:
    """The sorted, visible subfolders of root (none when root is no folder)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and _visible(e.name)) if root.is_dir() else []


def class_folders(root: Path) -> list[str]:
    """The sorted, visible subfolders of root; at least two."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder; expected one subfolder of images per class")
    classes = _subfolders(root)
    if len(classes) < 2:
        raise ValueError(f"{root}: expected one subfolder per class (at least 2), found {classes}")
    return classes


def _images_in(folder: Path) -> list[str]:
    return sorted(
        e.name
        for e in os.scandir(folder)
        if e.is_file() and _visible(e.name) and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES
    )


def list_files(root: Path, classes: list[str], every_class: bool) -> FileList:
    """The images of each class folder under root, labelled by the class's position in classes.

    every_class: a class folder that is missing or holds no image is refused (a training split);
    otherwise it contributes nothing (a held-out split need not cover every class). A visible
    folder under root that is not a class is refused either way, since its images have no label.
    """
    strays = sorted(set(_subfolders(root)) - set(classes))
    if strays:
        raise ValueError(f"{root}: {', '.join(strays)} are not classes of the training split ({', '.join(classes)})")
    names: list[bytes] = []
    labels: list[int] = []
    suffixes = "/".join(IMAGE_SUFFIXES)
    for label, name in enumerate(classes):
        folder = root / name
        files = _images_in(folder) if folder.is_dir() else []
        if every_class and not files:
            raise ValueError(
                f"{folder}: no {suffixes} images; every class folder needs at least one "
                "(an empty one would still take a label and shift the labels after it): remove it or add images"
            )
        names.extend(os.fsencode(os.path.join(name, f)) for f in files)
        labels.extend([label] * len(files))
    if not names:
        raise ValueError(f"{root}: no {suffixes} images in {', '.join(classes)}")
    return FileList(str(root), np.asarray(names, dtype=bytes), np.asarray(labels, np.int32))


def held_out(labels: np.ndarray, fraction: float, seed: int = SPLIT_SEED) -> np.ndarray:
    """A fixed, seeded, class-stratified held-out mask: round(fraction * n_c) of each class's n_c items."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test[idx[: int(round(len(idx) * fraction))]] = True
    return test


def image_folder(data_dir: str | Path, test_fraction: float) -> ImageFolder:
    """train/ and val/ (or test/) when present, else one folder of classes split with held_out()."""
    root = Path(data_dir)
    test_root = next((root / s for s in TEST_SPLITS if (root / s).is_dir()), None)
    train_root = root / TRAIN_SPLIT if (root / TRAIN_SPLIT).is_dir() else root
    classes = class_folders(train_root)
    train = list_files(train_root, classes, every_class=True)
    if test_root is not None and train_root != root:
        return ImageFolder(train, list_files(test_root, classes, every_class=False), tuple(classes))
    test = held_out(train.labels, test_fraction)
    if not test.any():
        least = int(np.bincount(train.labels).min())
        needed = next(n for n in itertools.count(1) if round(n * test_fraction) >= 1)  # as held_out() rounds
        raise ValueError(
            f"{root}: the held-out split is empty: a test fraction of {test_fraction:g} of {least} image(s) per class "
            f"rounds to none; each class needs at least {needed} images, or give the folder "
            f"{TRAIN_SPLIT}/ and {TEST_SPLITS[0]}/ subfolders"
        )
    return ImageFolder(train.subset(~test), train.subset(test), tuple(classes))


def _names(files: FileList) -> list[str]:
    return [os.fsdecode(n) for n in files.names]


def split_record(folder: ImageFolder, data_dir: str | Path) -> bytes:
    """The folder's split as JSON: its classes and, per split, the root (relative to data_dir), the file
    names (relative to that root, undecodable bytes as surrogate escapes) and the labels."""

    def entry(files: FileList) -> dict[str, object]:
        return {"root": os.path.relpath(files.root, data_dir), "names": _names(files), "labels": files.labels.tolist()}

    record = {"classes": list(folder.class_names), "train": entry(folder.train), "test": entry(folder.test)}
    return json.dumps(record).encode()


def recorded_split(path: Path, data_dir: str | Path, current: ImageFolder) -> tuple[ImageFolder, int, int]:
    """The split a run recorded in ``path`` (split_record), read against data_dir as it is now (current):
    (the recorded split, how many of the folder's images it leaves out, how many of its images are gone).

    A record that cannot be read, or that names other classes than the folder has, is a ValueError
    naming the file. Gone images stay in the lists: reading them fails, and they are skipped and
    counted as unreadable ones are.
    """
    try:
        record = json.loads(path.read_bytes())
        classes = tuple(record["classes"])
        splits = [
            FileList(
                os.path.join(data_dir, record[s]["root"]),
                np.asarray([os.fsencode(n) for n in record[s]["names"]], dtype=bytes).reshape(-1),
                np.asarray(record[s]["labels"], np.int32).reshape(-1),
            )
            for s in ("train", "test")
        ]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a split record of this run ({type(e).__name__}: {e}); restore it") from None
    if classes != current.class_names:
        raise ValueError(
            f"{path}: the run's classes ({', '.join(classes)}) differ from the folder's "
            f"({', '.join(current.class_names)}); resume with the folder the run started with"
        )

    def paths(*lists: FileList) -> set[str]:
        return {os.path.normpath(os.path.join(f.root, n)) for f in lists for n in _names(f)}

    recorded, now = paths(*splits), paths(current.train, current.test)
    return ImageFolder(splits[0], splits[1], classes), len(now - recorded), len(recorded - now)
