"""resnet_data: image folders, decoding, torchvision's ImageNet transforms, and the Grain pipeline."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import grain
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision import transforms as T
from torchvision.transforms import functional as F
from torchvision.transforms import v2

from resnet_data import transforms
from resnet_data.folders import image_folder
from resnet_data.images import MAX_PIXELS, UnreadableImageError, read_rgb
from resnet_data.pipeline import BatchStream, eval_batches, eval_dataset, train_batches

REPO = Path(__file__).resolve().parents[1]
# Sizes with odd, even, portrait, landscape and square shapes, some smaller than the crop.
SIZES = [(500, 375), (97, 131), (256, 256), (300, 1000), (33, 47)]
ONE = grain.sharding.ShardOptions(0, 1)


def _random_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _write_folder(root: Path, rng: np.random.Generator, per_class: dict[str, int], size=(20, 16)) -> None:
    for name, n in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _random_image(rng, size[0] + i, size[1]).save(root / name / f"{i}.jpg")


def _png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG file written by hand, so its header can claim any size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# ---- transforms: torchvision's definitions, pixel for pixel


@pytest.mark.parametrize("width, height", SIZES)
def test_eval_crop_equals_torchvision_resize_and_centre_crop(width, height):
    image = _random_image(np.random.default_rng(width * height), width, height)
    ours = transforms.eval_crop(image, 224)
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, np.asarray(T.Compose([T.Resize(256), T.CenterCrop(224)])(image)))
    np.testing.assert_array_equal(ours, np.asarray(v2.Compose([v2.Resize(256), v2.CenterCrop(224)])(image)))
    # Other sizes keep the 224/256 ratio: 16 -> resize 18, crop 16.
    small = np.asarray(T.Compose([T.Resize(transforms.eval_resize_side(16)), T.CenterCrop(16)])(image))
    np.testing.assert_array_equal(transforms.eval_crop(image, 16), small)


@pytest.mark.parametrize("width, height", SIZES)
def test_resized_crop_given_a_box_equals_torchvision(width, height):
    rng = np.random.default_rng(width + height)
    image = _random_image(rng, width, height)
    for _ in range(3):
        box = transforms.random_resized_crop_box(rng, width, height)
        expected = np.asarray(F.resized_crop(image, *box, [224, 224], antialias=True))
        np.testing.assert_array_equal(np.asarray(transforms.resized_crop(image, box, 224)), expected)


def test_train_crop_is_the_box_then_a_coin_flip():
    image = _random_image(np.random.default_rng(0), 97, 131)
    flips = []
    for seed in range(8):
        got = transforms.train_crop(image, np.random.default_rng(seed), 32, flip=True)
        rng = np.random.default_rng(seed)
        plain = np.asarray(transforms.resized_crop(image, transforms.random_resized_crop_box(rng, 97, 131), 32))
        flipped = rng.random() < 0.5
        np.testing.assert_array_equal(got, plain[:, ::-1] if flipped else plain)
        flips.append(flipped)
    assert 0 < sum(flips) < len(flips)
    unflipped = transforms.train_crop(image, np.random.default_rng(1), 32, flip=False)
    rng = np.random.default_rng(1)
    box = transforms.random_resized_crop_box(rng, 97, 131)
    np.testing.assert_array_equal(unflipped, np.asarray(transforms.resized_crop(image, box, 32)))


@pytest.mark.parametrize("width, height", [(500, 375), (300, 1000)])
def test_crop_boxes_follow_torchvision_distribution(width, height):
    """The same law as RandomResizedCrop.get_params: area share, aspect ratio and position, by KS tests."""
    n = 3000
    rng = np.random.default_rng(7)
    ours = np.array([transforms.random_resized_crop_box(rng, width, height) for _ in range(n)], np.float64)
    torch.manual_seed(7)
    probe = torch.zeros(3, height, width)
    theirs = np.array(
        [
            T.RandomResizedCrop.get_params(probe, list(transforms.CROP_SCALE), list(transforms.CROP_RATIO))
            for _ in range(n)
        ],
        np.float64,
    )

    def features(boxes: np.ndarray) -> dict[str, np.ndarray]:
        top, left, h, w = boxes.T
        return {
            "area": h * w / (width * height),
            "log_aspect": np.log(w / h),
            "top": top / np.maximum(height - h, 1),
            "left": left / np.maximum(width - w, 1),
        }

    for name, a in features(ours).items():
        b = features(theirs)[name]
        assert stats.ks_2samp(a, b).pvalue > 1e-3, name
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    assert ours[:, 2:].min() >= 1


def test_crop_box_falls_back_to_the_centre_like_torchvision():
    """An extreme aspect ratio defeats the 10 random draws: torchvision's central fallback."""
    rng = np.random.default_rng(0)
    probe = torch.zeros(3, 10, 4000)
    for _ in range(20):
        box = transforms.random_resized_crop_box(rng, 4000, 10, scale=(0.9, 1.0))
        assert box == tuple(T.RandomResizedCrop.get_params(probe, [0.9, 1.0], list(transforms.CROP_RATIO)))


# ---- decoding: every mode to RGB, 16 bits scaled, bad files refused with a sentence


def test_modes_become_rgb_as_torchvision_loads_them(tmp_path):
    rgb = _random_image(np.random.default_rng(1), 13, 9)
    cases = {
        "grey.png": rgb.convert("L"),
        "rgba.png": rgb.convert("RGBA"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "palette.png": rgb.convert("P"),
        "bilevel.png": rgb.convert("1"),
        "grey_alpha.png": rgb.convert("LA"),
        "rgb.jpg": rgb,
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
        with Image.open(tmp_path / name) as original:
            expected = np.asarray(original.convert("RGB"))  # torchvision's pil_loader
        got = read_rgb(tmp_path / name)
        assert got.mode == "RGB", name
        np.testing.assert_array_equal(np.asarray(got), expected, err_msg=name)


def test_palette_with_transparency_goes_through_rgba_without_a_warning(tmp_path):
    image = _random_image(np.random.default_rng(2), 8, 6).convert("P")
    image.info["transparency"] = 0
    image.save(tmp_path / "t.png", transparency=0)
    with Image.open(tmp_path / "t.png") as original:
        assert "transparency" in original.info
        expected = np.asarray(original.convert("RGBA").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(read_rgb(tmp_path / "t.png")), expected)  # warnings are errors here


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    wide = np.array([[0, 128, 257, 32896], [40000, 65279, 65535, 1000]], np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    with Image.open(tmp_path / "wide.png") as original:
        assert original.mode.startswith("I")  # the case PIL's own RGB conversion clips at 255
    got = np.asarray(read_rgb(tmp_path / "wide.png"))
    expected = np.round(wide / 257).astype(np.uint8)
    np.testing.assert_array_equal(got, np.repeat(expected[..., None], 3, axis=-1))


def test_16_bit_colour_png_keeps_its_range(tmp_path):
    rows = np.array([[[0, 32896, 65535], [40000, 1000, 65280]]], ">u2")
    (tmp_path / "c16.png").write_bytes(_png(2, 1, 16, 2, b"".join(b"\0" + r.tobytes() for r in rows)))
    got = np.asarray(read_rgb(tmp_path / "c16.png")).astype(int)
    assert np.abs(got - np.round(rows.astype(int) / 257)).max() <= 1


@pytest.mark.parametrize("side", [10_000, 20_000])
def test_decompression_bombs_are_refused_with_a_sentence(tmp_path, side):
    """A header claiming side x side pixels (100M warns in PIL, 400M errors): refused before decoding."""
    assert side * side > MAX_PIXELS
    (tmp_path / "bomb.png").write_bytes(_png(side, side, 1, 0, b"\0"))
    with pytest.raises(UnreadableImageError, match="decompression bomb"):
        read_rgb(tmp_path / "bomb.png")


@pytest.mark.parametrize(
    "content", [b"", b"not an image", b"\x89PNG\r\n\x1a\n truncated", b"\xff\xd8\xff\xe0 truncated jpeg"]
)
def test_unreadable_files_name_the_path(tmp_path, content):
    (tmp_path / "bad.jpg").write_bytes(content)
    with pytest.raises(UnreadableImageError, match="bad.jpg: cannot read image"):
        read_rgb(tmp_path / "bad.jpg")


def test_truncated_jpeg_is_unreadable(tmp_path):
    _random_image(np.random.default_rng(3), 64, 48).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImageError, match="cut.jpg"):
        read_rgb(tmp_path / "cut.jpg")


# ---- folders: hidden entries, empty classes, splits


def test_hidden_entries_are_neither_classes_nor_images(tmp_path):
    rng = np.random.default_rng(4)
    _write_folder(tmp_path, rng, {"cat": 3, "dog": 2, ".ipynb_checkpoints": 2})
    _random_image(rng, 5, 5).save(tmp_path / "cat" / ".hidden.jpg")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    folder = image_folder(tmp_path, test_fraction=0.4)
    assert folder.class_names == ("cat", "dog")
    names = [folder.train[i][0] for i in range(len(folder.train))] + [
        folder.test[i][0] for i in range(len(folder.test))
    ]
    assert len(names) == 5 and not any("/." in n for n in names)
    assert sorted(folder.test.labels.tolist()) == [0, 1]  # stratified: round(0.4 * 3) cats, round(0.4 * 2) dogs


def test_an_empty_class_is_refused_naming_it(tmp_path):
    _write_folder(tmp_path / "train", np.random.default_rng(5), {"a": 2, "c": 2})
    (tmp_path / "train" / "b").mkdir()
    _random_image(np.random.default_rng(6), 4, 4).save(tmp_path / "train" / "b" / ".only_hidden.jpg")
    _write_folder(tmp_path / "val", np.random.default_rng(7), {"a": 1, "c": 1})
    with pytest.raises(ValueError, match=r"train/b: no .* images; every class folder needs at least one"):
        image_folder(tmp_path, 0.2)


def test_train_and_val_splits_share_the_training_classes(tmp_path):
    rng = np.random.default_rng(8)
    _write_folder(tmp_path / "train", rng, {"a": 3, "b": 2, "c": 2})
    _write_folder(tmp_path / "val", rng, {"a": 1, "c": 2})  # no b: allowed in a held-out split
    folder = image_folder(tmp_path, 0.5)
    assert (len(folder.train), len(folder.test), folder.class_names) == (7, 3, ("a", "b", "c"))
    assert folder.test.labels.tolist() == [0, 2, 2]
    _write_folder(tmp_path / "val", rng, {"zebra": 1})
    with pytest.raises(ValueError, match="zebra are not classes of the training split"):
        image_folder(tmp_path, 0.5)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="one subfolder of images per class"):
        image_folder(tmp_path / "nowhere", 0.2)
    _write_folder(tmp_path, np.random.default_rng(9), {"only": 2})
    with pytest.raises(ValueError, match="at least 2"):
        image_folder(tmp_path, 0.2)


# ---- the Grain pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    _write_folder(root / "train", np.random.default_rng(10), {"a": 7, "b": 6, "c": 5})
    _write_folder(root / "val", np.random.default_rng(11), {"a": 3, "b": 2, "c": 2})
    (root / "train" / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return image_folder(root, 0.2)


def _take(stream, n: int) -> list[dict]:
    return [{k: np.array(v) for k, v in next(stream).items()} for _ in range(n)]


def _rows(batch: dict) -> list[tuple[bytes, int]]:
    return sorted(
        zip(map(bytes, batch["image"].reshape(len(batch["label"]), -1)), batch["label"].tolist(), strict=True)
    )


def test_processes_read_their_own_shard_and_together_make_the_global_batch(folder):
    # Without the unreadable file: its stand-in comes from the same process's batch, which differs.
    files = folder.train.subset(np.char.find(folder.train.names, b"broken") < 0)
    single = BatchStream(train_batches(files, 12, True, 4, 3, ONE), 0)
    shards = [BatchStream(train_batches(files, 12, True, 2, 3, grain.sharding.ShardOptions(i, 2)), 0) for i in (0, 1)]
    for _ in range(6):  # past the end of the first epoch (18 images): reshuffled, re-augmented
        whole = _take(single, 1)[0]
        parts = [_take(s, 1)[0] for s in shards]
        assert _rows(whole) == sorted(_rows(parts[0]) + _rows(parts[1]))
        assert not set(_rows(parts[0])) & set(_rows(parts[1]))
    for s in (single, *shards):
        s.close()


def test_unreadable_training_files_are_skipped_named_and_replaced(folder):
    stream = BatchStream(train_batches(folder.train, 12, False, 4, 0, ONE), 0)
    batches = _take(stream, 10)  # two epochs of 19 images
    stream.close()
    skipped = [p for b in batches for p in b["skipped"]]
    assert len(skipped) == 2 and all("broken.jpg: cannot read image" in p for p in skipped)
    assert all(b["image"].shape == (4, 12, 12, 3) and b["image"].dtype == np.uint8 for b in batches)


def test_stream_state_resumes_at_the_next_unseen_batch_whatever_the_workers(folder):
    batches = train_batches(folder.train, 12, True, 4, 5, ONE)
    stream = BatchStream(batches, 0)
    straight = _take(stream, 6)
    stream.close()
    first = BatchStream(batches, 0)
    _take(first, 2)
    state = json.loads(json.dumps(first.get_state()))  # what grain's orbax handler writes
    first.close()
    resumed = BatchStream(batches, 1)  # one worker process this time
    resumed.set_state(state)
    again = _take(resumed, 4)
    resumed.close()
    for a, b in zip(straight[2:], again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_eval_pass_sees_every_image_once_across_processes(folder):
    n = len(folder.test)
    single = list(eval_dataset(folder.test, 12, 4, ONE, 0))
    shards = [list(eval_dataset(folder.test, 12, 2, grain.sharding.ShardOptions(i, 2), 0)) for i in (0, 1)]
    assert len(single) == eval_batches(n, 4, 1) == math.ceil(n / 4)
    assert len(shards[0]) == len(shards[1]) == eval_batches(n, 2, 2)

    def real(batches: list[dict]) -> list[tuple[bytes, int]]:
        rows = []
        for b in batches:
            keep = b["mask"]
            rows += _rows({"image": b["image"][keep], "label": b["label"][keep]})
        return sorted(rows)

    assert len(real(single)) == n
    assert real(single) == sorted(real(shards[0]) + real(shards[1]))
    expected = [transforms.eval_crop(read_rgb(folder.test[i][0]), 12).tobytes() for i in range(n)]
    assert real(single) == sorted(zip(expected, folder.test.labels.tolist(), strict=True))


MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys
    import grain, numpy as np, psutil
    from resnet_data.folders import image_folder
    from resnet_data.pipeline import BatchStream, train_batches

    folder = image_folder(sys.argv[1], 0.2)
    stream = BatchStream(train_batches(folder.train, 64, True, 8, 0, grain.sharding.ShardOptions(0, 1)), 1)
    me = psutil.Process()
    rss = lambda: (me.memory_info().rss, sum(c.memory_info().rss for c in me.children(recursive=True)))
    first = None
    peak = (0, 0)
    for _ in range(len(folder.train) // 8):  # one epoch
        batch = next(stream)
        del batch
        now = rss()
        first = first or now
        peak = tuple(max(a, b) for a, b in zip(peak, now))
    stream.close()
    growth = [(p - f) / 2**20 for p, f in zip(peak, first)]
    print(json.dumps({"images": len(folder.train), "self_mib": growth[0], "workers_mib": growth[1]}))
    """
)


@pytest.mark.slow
def test_loader_memory_stays_flat_as_the_folder_grows(tmp_path):
    """One epoch over N and over 4N 640x480 JPEGs: the resident memory of the loading process and of its
    worker grows no more over 4N images than over N (after the first batch), where holding the decoded
    images would add 0.9 MB each."""
    n = 24
    peaks = {}
    for count in (n, 4 * n):
        root = tmp_path / str(count)
        _write_folder(root, np.random.default_rng(count), {"a": count // 2, "b": count // 2}, size=(640, 480))
        run = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(root)], cwd=REPO, capture_output=True, text=True, timeout=600
        )
        assert run.returncode == 0, run.stderr
        peaks[count] = json.loads(run.stdout.strip().splitlines()[-1])
    decoded_mib = (peaks[4 * n]["images"] - peaks[n]["images"]) * 640 * 480 * 3 / 2**20
    for who in ("self_mib", "workers_mib"):
        assert peaks[4 * n][who] - peaks[n][who] < decoded_mib / 8, (who, decoded_mib, peaks)
