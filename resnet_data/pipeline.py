"""Grain datasets over an image folder: files decoded and transformed in worker processes, uint8 batches out.

Training reads an endless stream: the file list shuffled afresh each epoch (Grain's shuffle
reseeds per epoch), each image cropped and flipped with a generator seeded by (seed, its position
in the stream), so the stream is a pure function of the seed. A process takes every P-th image of
it (``stream[p::P]``), so the P processes' batches k together hold the single-process batch k,
whatever P is; worker processes then split a process's batches between them. The iterator's
state (``get_state``/``set_state``, or grain.checkpoint with orbax) resumes at the next unseen
batch.

A file that cannot be read is never a crash: its batch lists it under ``skipped`` (path and
reason), and its place is taken by another image of the same batch (training) or masked out
(evaluation), so every batch keeps its shape and the stream stays a function of the seed.
"""

from __future__ import annotations

import functools
import math
import typing
from collections.abc import Callable, Sequence

import grain
import numpy as np
from absl import flags
from PIL import Image

from .folders import FileList
from .images import UnreadableImageError, read_rgb
from .transforms import eval_crop, train_crop

# Each worker builds one batch at a time on one thread: parallelism comes from the worker processes,
# and the read buffer holds batches (tens of MB each at 224x224), so it is kept to one.
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)
# Finished batches each worker keeps ready for the training loop.
WORKER_BUFFER = 2


class Decoded(typing.NamedTuple):
    """One example after decoding: the image (None when unusable), its label, and why it is unusable."""

    image: np.ndarray | None
    label: int
    problem: str | None


def _decoded(path: str, label: int, crop: Callable[[Image.Image], np.ndarray]) -> Decoded:
    """One file read and cropped, or the sentence (naming the file) that says why it cannot be used."""
    try:
        return Decoded(crop(read_rgb(path)), label, None)
    except UnreadableImageError as e:
        reason = str(e)
        return Decoded(None, label, reason if reason.startswith(path) else f"{path}: {reason}")


class TrainExample(grain.transforms.RandomMap):
    """(path, label) -> RandomResizedCrop(size) + optional flip of the decoded image."""

    def __init__(self, size: int, flip: bool) -> None:
        self.size, self.flip = size, flip

    def random_map(self, element: tuple[str, int], rng: np.random.Generator) -> Decoded:
        path, label = element
        return _decoded(path, label, lambda image: train_crop(image, rng, self.size, self.flip))


class EvalExample(grain.transforms.Map):
    """Index i -> files[i] resized and centre-cropped; indices past the end are padding."""

    def __init__(self, files: FileList, size: int) -> None:
        self.files, self.size = files, size

    def map(self, index: int) -> Decoded:
        if index >= len(self.files):
            return Decoded(None, 0, None)
        path, label = self.files[index]
        return _decoded(path, label, lambda image: eval_crop(image, self.size))


def _problems(examples: Sequence[Decoded]) -> tuple[str, ...]:
    return tuple(e.problem for e in examples if e.problem is not None)


def train_batch(examples: Sequence[Decoded]) -> dict[str, typing.Any]:
    """Stack a batch; an unusable example's place goes to the next usable one (cyclically)."""
    usable = [e for e in examples if e.image is not None]
    if not usable:
        raise UnreadableImageError("no image of a whole batch could be read: " + "; ".join(_problems(examples)))
    filled = [e if e.image is not None else usable[i % len(usable)] for i, e in enumerate(examples)]
    return {
        "image": np.stack([typing.cast(np.ndarray, e.image) for e in filled]),
        "label": np.asarray([e.label for e in filled], np.int32),
        "skipped": _problems(examples),
    }


def eval_batch(examples: Sequence[Decoded], size: int) -> dict[str, typing.Any]:
    """Stack a batch with a mask; unusable and padding examples are zeros with mask False."""
    blank = np.zeros((size, size, 3), np.uint8)
    return {
        "image": np.stack([blank if e.image is None else e.image for e in examples]),
        "label": np.asarray([e.label for e in examples], np.int32),
        "mask": np.asarray([e.image is not None for e in examples]),
        "skipped": _problems(examples),
    }


def _prefetched(ds: grain.MapDataset, workers: int) -> grain.IterDataset:
    """ds read by `workers` processes (0: by a thread of this process)."""
    it = ds.to_iter_dataset(READ_OPTIONS)
    if workers:
        # Grain 0.2.18 reads an absl flag when it starts workers, which fails unless absl parsed the
        # command line (google/grain#1355, fixed later): use every flag's default, as a script would.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=WORKER_BUFFER))
    return it


def train_batches(
    files: FileList, size: int, flip: bool, batch_size: int, seed: int, shard: grain.sharding.ShardOptions
) -> grain.MapDataset:
    """This shard's endless training batches, {"image": (batch_size, size, size, 3) uint8, "label", "skipped"}.

    batch_size is this process's share of the global batch; shard names this process among all.
    """
    stream = grain.MapDataset.source(files).seed(seed).shuffle().repeat().random_map(TrainExample(size, flip))
    ours = stream[shard.shard_index :: shard.shard_count]
    return ours.batch(batch_size, batch_fn=train_batch)


class BatchStream(grain.DatasetIterator):
    """Reads a MapDataset of batches in order with `workers` processes; its state is the next batch's index.

    The state does not depend on the number of workers, so a run may resume with another number of
    them (Grain's own prefetch state records one position per worker).
    """

    def __init__(self, batches: grain.MapDataset, workers: int) -> None:
        super().__init__()
        self._batches, self._workers = batches, workers
        self._next = 0
        self._reader: grain.DatasetIterator | None = None

    def start_prefetch(self) -> None:
        if self._reader is None:
            self._reader = iter(_prefetched(self._batches[self._next :], self._workers))
            self._reader.start_prefetch()

    def __next__(self) -> typing.Any:
        self.start_prefetch()
        batch = next(typing.cast(grain.DatasetIterator, self._reader))
        self._next += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"next_batch": self._next}

    def set_state(self, state: dict[str, typing.Any]) -> None:
        self._stop_reader()
        self._next = int(state["next_batch"])

    def _stop_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def close(self) -> None:
        self._stop_reader()
        super().close()


def eval_batches(images: int, batch_size: int, shard_count: int) -> int:
    """Batches each of shard_count processes evaluates so that all of them see every image once."""
    return math.ceil(math.ceil(images / shard_count) / batch_size)


def eval_dataset(
    files: FileList, size: int, batch_size: int, shard: grain.sharding.ShardOptions, workers: int
) -> grain.IterDataset:
    """One pass over files, this shard's share: eval_batches() batches of {"image", "label", "mask", "skipped"}.

    Image i goes to process i % shard_count; the end is padded (mask False) so that every
    process runs the same number of full batches.
    """
    total = eval_batches(len(files), batch_size, shard.shard_count) * batch_size * shard.shard_count
    ours = grain.MapDataset.range(total)[shard.shard_index :: shard.shard_count].map(EvalExample(files, size))
    return _prefetched(ours.batch(batch_size, batch_fn=functools.partial(eval_batch, size=size)), workers)
