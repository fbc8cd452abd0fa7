"""Where the loop's batches come from, placed on the mesh: arrays in memory, a Grain image-folder stream, or
synthetic images made on the device.

Every feed yields uint8 NHWC global batches sharded over 'data' (normalisation happens in the step)
and knows its classes and the statistics the model normalises with. The in-memory feed orders an
epoch by (seed, epoch) alone; the streamed feed's position lives in its iterator, which is saved
with each checkpoint; the synthetic feed repeats one batch.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from parity.conversion.atomic import atomic_write
from resnet_data.folders import SPLIT_FILE, FileList, image_folder, recorded_split, split_record
from resnet_data.images import UnreadableImageError, read_rgb
from resnet_data.pipeline import BatchStream, eval_batches, eval_dataset, train_batches
from resnet_data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_crop

from . import sharding
from .config import IN_MEMORY, TrainConfig
from .data import Dataset, epoch_permutation, limited, load_dataset

log = logging.getLogger(__name__)

# Held-out images the PyTorch export is verified on when the test split is streamed (decoding and
# running all of ImageNet's 50,000 through torch on the CPU would take longer than an epoch).
STREAM_CHECK_IMAGES = 64
# The checkpoint item holding each process's data-iterator state.
DATA_ITEM = "data"
# Synthetic data: ImageNet-1k's classes and training-set size (the epoch, unless --train-limit).
SYNTHETIC_CLASSES = 1000
IMAGENET_TRAIN_IMAGES = 1_281_167
# Keys of the synthetic train and test images, apart from the model's and augmentation's.
SYNTHETIC_STREAM = 2

Batch = tuple[jax.Array, ...]


class Feed(abc.ABC):
    """What the loop needs from a dataset; subclasses say where the batches come from."""

    def __init__(
        self,
        name: str,
        class_names: tuple[str, ...],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        train_size: int,
        test_images: np.ndarray,
        mesh: Mesh,
    ) -> None:
        self.name = name
        self.class_names = class_names  # label i is class_names[i]
        self.num_classes = len(class_names)
        self.mean, self.std = mean, std  # per channel, 0..1 units: what the step normalises with
        self.train_size = train_size  # training images per epoch
        self.test_images = test_images  # uint8 NHWC held-out images the PyTorch export is verified on
        self.mesh = mesh
        self.skipped = 0  # unreadable images left out of training so far

    @abc.abstractmethod
    def train_batches(self, epoch: int, steps: range, batch_size: int) -> Iterator[Batch]:
        """(images, labels) for the given steps of an epoch (steps within it, 0-based), in order."""

    @abc.abstractmethod
    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        """(images, labels, mask) over the whole held-out split; mask is False on padding."""

    def checkpoint_items(self) -> dict[str, Any]:
        """Orbax save args of what a checkpoint must hold besides the train state."""
        return {}

    def restore_items(self) -> dict[str, Any]:
        """Orbax restore args matching checkpoint_items()."""
        return {}

    def record(self, run_dir: Path) -> None:  # noqa: B027 (a feed whose data cannot change records nothing)
        """Write what a resume needs to see the same data (process 0, once the run directory is checked)."""

    def close(self) -> None:  # noqa: B027 (a feed without worker processes has nothing to stop)
        """Stop worker processes, if any."""


def _padded(images: np.ndarray, labels: np.ndarray, batch_size: int, mesh: Mesh) -> Iterator[Batch]:
    """Global host arrays in batches; the last one padded with zeros and masked out."""
    n = len(labels)
    pad = (-n) % batch_size
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    mask = np.arange(n + pad) < n
    for start in range(0, n + pad, batch_size):
        part = slice(start, start + batch_size)
        yield sharding.put_batch(mesh, images[part], labels[part], mask[part])


class InMemoryFeed(Feed):
    """digits or CIFAR-10 as arrays in host memory; an epoch's order is a function of (seed, epoch)."""

    def __init__(self, ds: Dataset, seed: int, mesh: Mesh) -> None:
        super().__init__(ds.name, ds.class_names, ds.mean, ds.std, len(ds.train_labels), ds.test_images, mesh)
        self.ds, self.seed = ds, seed

    def train_batches(self, epoch: int, steps: range, batch_size: int) -> Iterator[Batch]:
        perm = epoch_permutation(self.seed, epoch, self.train_size)
        for i in steps:
            idx = perm[i * batch_size : (i + 1) * batch_size]
            yield sharding.put_batch(self.mesh, self.ds.train_images[idx], self.ds.train_labels[idx])

    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        return _padded(self.ds.test_images, self.ds.test_labels, batch_size, self.mesh)


def _check_images(files: FileList, size: int, count: int) -> np.ndarray:
    """The first `count` readable held-out images, as evaluation sees them."""
    images: list[np.ndarray] = []
    for i in range(len(files)):
        if len(images) == count:
            break
        try:
            images.append(eval_crop(read_rgb(files[i][0]), size))
        except UnreadableImageError:
            continue
    return np.stack(images)


def _workers(config: TrainConfig) -> int:
    return (os.cpu_count() or 1) if config.workers < 0 else config.workers


class StreamedFeed(Feed):
    """An image folder read through Grain: this process's shard, decoded and augmented by worker processes."""

    def __init__(self, config: TrainConfig, mesh: Mesh) -> None:
        folder = image_folder(config.data_dir, config.test_fraction)
        recorded = Path(config.run_dir) / SPLIT_FILE
        if config.resume and recorded.exists():
            folder, added, gone = recorded_split(recorded, config.data_dir, folder)
            if added or gone:
                log.warning(
                    "%s: %d image(s) added since the run started are left out and %d of its images are gone "
                    "(skipped and counted): the run keeps the split recorded in %s",
                    config.data_dir,
                    added,
                    gone,
                    recorded,
                )
        self.folder, self.data_dir = folder, config.data_dir
        train = folder.train.subset(limited(len(folder.train), config.train_limit))
        check = _check_images(folder.test, config.image_size, STREAM_CHECK_IMAGES)
        super().__init__("imagefolder", folder.class_names, IMAGENET_MEAN, IMAGENET_STD, len(train), check, mesh)
        self.test_files, self.size, self.workers = folder.test, config.image_size, _workers(config)
        local_batch = config.batch_size // jax.process_count()
        shard = grain.sharding.ShardByJaxProcess()
        batches = train_batches(train, config.image_size, config.flip, local_batch, config.seed, shard)
        self.stream = BatchStream(batches, self.workers)
        log.info(
            "%s: %d training images, %d held out, %d classes; %d worker processes decode them",
            config.data_dir,
            len(train),
            len(folder.test),
            self.num_classes,
            self.workers,
        )

    def _note_skipped(self, problems: tuple[str, ...]) -> None:
        for problem in problems:
            log.warning("skipped: %s", problem)

    def train_batches(self, epoch: int, steps: range, batch_size: int) -> Iterator[Batch]:
        for _ in steps:
            batch = next(self.stream)
            self._note_skipped(batch["skipped"])
            self.skipped += len(batch["skipped"])
            yield sharding.put_local(self.mesh, batch["image"], batch["label"])

    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        count = jax.process_count()
        shard = grain.sharding.ShardByJaxProcess()
        reader = iter(eval_dataset(self.test_files, self.size, batch_size // count, shard, self.workers))
        try:
            for _ in range(eval_batches(len(self.test_files), batch_size // count, count)):
                batch = next(reader)
                self._note_skipped(batch["skipped"])
                yield sharding.put_local(self.mesh, batch["image"], batch["label"], batch["mask"])
        finally:
            reader.close()

    def record(self, run_dir: Path) -> None:
        """The split, in run_dir/split.json: a resume uses these files, whatever the folder holds then."""
        atomic_write(run_dir / SPLIT_FILE, lambda f: f.write(split_record(self.folder, self.data_dir)))

    def checkpoint_items(self) -> dict[str, Any]:
        return {DATA_ITEM: grain.checkpoint.CheckpointSave(self.stream)}

    def restore_items(self) -> dict[str, Any]:
        return {DATA_ITEM: grain.checkpoint.CheckpointRestore(self.stream)}

    def close(self) -> None:
        self.stream.close()


class SyntheticFeed(Feed):
    """One batch of random uint8 images and labels made on the device and trained on at every step:
    the step alone, with no loader and no host-to-device copy."""

    def __init__(self, config: TrainConfig, mesh: Mesh) -> None:
        shape = (config.batch_size, config.image_size, config.image_size, 3)
        test = np.random.default_rng([config.seed, SYNTHETIC_STREAM]).integers(0, 256, shape, np.uint8)
        classes = tuple(str(c) for c in range(SYNTHETIC_CLASSES))
        train_size = config.train_limit or IMAGENET_TRAIN_IMAGES
        super().__init__("synthetic", classes, IMAGENET_MEAN, IMAGENET_STD, train_size, test, mesh)

        def draw(key: jax.Array) -> Batch:
            image_key, label_key = jax.random.split(key)
            labels = jax.random.randint(label_key, shape[:1], 0, SYNTHETIC_CLASSES, jnp.int32)
            return jax.random.bits(image_key, shape, jnp.uint8), labels

        key = jax.random.fold_in(jax.random.key(config.seed), SYNTHETIC_STREAM)
        self.batch = jax.jit(draw, out_shardings=sharding.batch_sharding(mesh))(key)

    def train_batches(self, epoch: int, steps: range, batch_size: int) -> Iterator[Batch]:
        for _ in steps:
            yield self.batch

    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        labels = np.arange(len(self.test_images), dtype=np.int32) % SYNTHETIC_CLASSES
        return _padded(self.test_images, labels, batch_size, self.mesh)


def open_feed(config: TrainConfig, mesh: Mesh) -> Feed:
    """The feed config.dataset names."""
    if config.dataset in IN_MEMORY:
        return InMemoryFeed(load_dataset(config), config.seed, mesh)
    if config.dataset == "synthetic":
        return SyntheticFeed(config, mesh)
    return StreamedFeed(config, mesh)
