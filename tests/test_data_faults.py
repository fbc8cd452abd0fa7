"""Image files that would stall or exhaust a reader: FIFOs, stalled reads, images that explode when resized."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from resnet_data import images
from resnet_data.folders import FileList
from resnet_data.images import UnreadableImageError, read_rgb
from resnet_data.pipeline import EvalExample
from resnet_data.transforms import eval_crop

# A test of a would-be hang waits this long for an answer before it fails.
BOUND_S = 20.0


def _bounded(fn, *args):
    """fn(*args) on a daemon thread: its result or exception, or a failure if it does not end in BOUND_S."""
    out: list = []

    def run() -> None:
        try:
            out.append(("ok", fn(*args)))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(("error", e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(BOUND_S)
    assert out, f"{fn.__name__} did not return within {BOUND_S} s"
    return out[0]


def _png(path, size=(5, 7)) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)


def test_a_fifo_in_place_of_an_image_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "a.png"
    os.mkfifo(fifo)
    kind, value = _bounded(read_rgb, fifo)
    assert kind == "error" and isinstance(value, UnreadableImageError)
    assert str(fifo) in str(value) and "not a regular file" in str(value)


def test_a_fifo_in_an_image_folder_is_skipped_and_named(tmp_path):
    (tmp_path / "cat").mkdir()
    _png(tmp_path / "cat" / "good.png")
    os.mkfifo(tmp_path / "cat" / "stalls.png")
    files = FileList(str(tmp_path), np.asarray([b"cat/good.png", b"cat/stalls.png"]), np.zeros(2, np.int32))
    example = EvalExample(files, 4)
    kind, decoded = _bounded(example.map, 1)
    assert kind == "ok" and decoded.image is None
    assert "stalls.png" in decoded.problem and "not a regular file" in decoded.problem
    assert example.map(0).image.shape == (4, 4, 3)


def test_a_symlink_to_an_image_still_reads(tmp_path):
    _png(tmp_path / "real.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "real.png")
    assert read_rgb(tmp_path / "link.png").size == (5, 7)


def test_a_stalled_read_is_given_up_after_the_timeout(tmp_path, monkeypatch):
    _png(tmp_path / "slow.png")
    release = threading.Event()
    real_fdopen = os.fdopen

    class Stalled:
        def __init__(self, fd: int) -> None:
            self.inner = real_fdopen(fd, "rb")

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.inner.close()

        def read(self) -> bytes:
            release.wait(BOUND_S)  # a read that hangs like one on a stalled network mount
            return self.inner.read()

    monkeypatch.setattr(images.os, "fdopen", lambda fd, mode: Stalled(fd))
    start = time.monotonic()
    with pytest.raises(UnreadableImageError, match=r"slow\.png: reading took more than 0\.3 s"):
        read_rgb(tmp_path / "slow.png", timeout=0.3)
    release.set()
    assert time.monotonic() - start < BOUND_S / 2


def test_an_image_that_would_explode_when_resized_is_refused_before_the_resize(tmp_path):
    strip = tmp_path / "strip.png"
    Image.new("RGB", (1, 100_000)).save(strip)  # a few hundred bytes; 256 x 25,600,000 pixels after the resize
    assert strip.stat().st_size < 2000
    image = read_rgb(strip)
    with pytest.raises(UnreadableImageError, match=r"1x100000 image resized to 256x25600000 would have"):
        eval_crop(image, 224)
    files = FileList(str(tmp_path), np.asarray([b"strip.png"]), np.zeros(1, np.int32))
    decoded = EvalExample(files, 224).map(0)
    assert decoded.image is None and decoded.problem.startswith(str(strip))


def test_ordinary_thin_images_still_resize(tmp_path):
    Image.new("RGB", (10, 300)).save(tmp_path / "thin.png")
    assert eval_crop(read_rgb(tmp_path / "thin.png"), 224).shape == (224, 224, 3)


def test_one_image_per_class_in_a_single_folder_is_a_sentence(tmp_path):
    from resnet_data.folders import image_folder

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        _png(tmp_path / name / "only.png")
    with pytest.raises(ValueError, match=r"the held-out split is empty: a test fraction of 0\.2 of 1 image\(s\) per"):
        image_folder(tmp_path, 0.2)
    for name in ("cat", "dog"):  # three each: round(0.6) = 1 held out per class
        for i in range(2):
            _png(tmp_path / name / f"more{i}.png")
    folder = image_folder(tmp_path, 0.2)
    assert len(folder.test) == 2 and len(folder.train) == 4
