"""In-memory dataset loaders on tiny generated data in each real format, and the training config's flags.

Image folders stream through resnet_data (tests/test_data_pipeline.py)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from resnet_train import data
from resnet_train.config import TrainConfig, parse_args


def _write_cifar_batch(path, rng, n):
    """A batch as the official python version stores it: bytes keys, (N, 3072) uint8 rows, label list."""
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    batch = {
        b"batch_label": path.name.encode(),
        b"labels": labels,
        b"data": images.reshape(n, -1),
        b"filenames": [f"{i}.png".encode() for i in range(n)],
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return images.transpose(0, 2, 3, 1), np.asarray(labels)


def test_cifar10_batches_load_as_nhwc(tmp_path):
    rng = np.random.default_rng(1)
    train = [_write_cifar_batch(tmp_path / name, rng, 3 + i) for i, name in enumerate(data.CIFAR10_TRAIN)]
    test = _write_cifar_batch(tmp_path / data.CIFAR10_TEST, rng, 4)
    ds = data.load_cifar10(tmp_path)
    np.testing.assert_array_equal(ds.train_images, np.concatenate([t[0] for t in train]))
    np.testing.assert_array_equal(ds.train_labels, np.concatenate([t[1] for t in train]))
    np.testing.assert_array_equal(ds.test_images, test[0])
    assert ds.train_images.dtype == np.uint8 and ds.train_images.shape == (3 + 4 + 5 + 6 + 7, 32, 32, 3)
    expected_mean = ds.train_images.reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(ds.mean, expected_mean, rtol=1e-12)


def test_cifar10_errors_name_the_file(tmp_path):
    rng = np.random.default_rng(2)
    for name in data.CIFAR10_TRAIN[:4]:
        _write_cifar_batch(tmp_path / name, rng, 2)
    with pytest.raises(FileNotFoundError, match="data_batch_5"):
        data.load_cifar10(tmp_path)
    _write_cifar_batch(tmp_path / "data_batch_5", rng, 2)
    (tmp_path / data.CIFAR10_TEST).write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match="test_batch.*3072"):
        data.load_cifar10(tmp_path)
    # A pickle that would call a function is refused, not run.
    (tmp_path / data.CIFAR10_TEST).write_bytes(pickle.dumps({b"data": print}))
    with pytest.raises(ValueError, match="refusing builtins.print"):
        data.load_cifar10(tmp_path)


def _write_cifar_folder(root, rng):
    for name in (*data.CIFAR10_TRAIN, data.CIFAR10_TEST):
        _write_cifar_batch(root / name, rng, 2)


def test_cifar10_empty_or_folder_batches_are_sentences(tmp_path):
    _write_cifar_folder(tmp_path, np.random.default_rng(6))
    batch = tmp_path / data.CIFAR10_TRAIN[0]
    batch.write_bytes(b"")
    with pytest.raises(ValueError, match="data_batch_1: empty or truncated"):
        data.load_cifar10(tmp_path)
    batch.unlink()
    batch.mkdir()
    with pytest.raises(ValueError, match="data_batch_1: a folder"):
        data.load_cifar10(tmp_path)
    batch.rmdir()
    batch.write_bytes(pickle.dumps({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}))
    with pytest.raises(ValueError, match="data_batch_1: the batch holds no images"):
        data.load_cifar10(tmp_path)


def test_cifar10_values_above_255_are_refused_not_wrapped(tmp_path):
    _write_cifar_folder(tmp_path, np.random.default_rng(7))
    pixels = np.full((2, 3072), 100, np.int64)
    batch = {b"data": pixels, b"labels": [0, 1]}
    (tmp_path / data.CIFAR10_TEST).write_bytes(pickle.dumps(batch))
    assert data.load_cifar10(tmp_path).test_images.max() == 100  # integer pixels within 0..255 are fine
    pixels[1, 5] = 256  # would wrap to 0 as uint8
    (tmp_path / data.CIFAR10_TEST).write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match="test_batch: pixel values must be 0..255, found 100..256"):
        data.load_cifar10(tmp_path)
    batch[b"data"] = pixels.astype(np.float32) / 255
    (tmp_path / data.CIFAR10_TEST).write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match="expected integer pixel values 0..255, got dtype float32"):
        data.load_cifar10(tmp_path)


def test_digits_split_is_fixed_and_upscaled():
    ds = data.load_digits(image_size=32, test_fraction=0.2)
    assert ds.train_images.shape[1:] == ds.test_images.shape[1:] == (32, 32, 3)
    assert len(ds.train_labels) + len(ds.test_labels) == 1797 and abs(len(ds.test_labels) - 360) <= 5
    assert ds.train_images.dtype == np.uint8 and ds.train_images.max() == 255
    np.testing.assert_array_equal(ds.train_images[..., 0], ds.train_images[..., 2])
    again = data.load_digits(image_size=32, test_fraction=0.2)
    np.testing.assert_array_equal(ds.test_labels, again.test_labels)
    assert ds.class_names == tuple("0123456789")


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = data.epoch_permutation(3, 5, 100)
    assert sorted(a.tolist()) == list(range(100))
    np.testing.assert_array_equal(a, data.epoch_permutation(3, 5, 100))
    assert not np.array_equal(a, data.epoch_permutation(3, 6, 100))
    assert not np.array_equal(a, data.epoch_permutation(4, 5, 100))


def test_every_config_field_is_a_flag():
    config = parse_args(["--lr", "0.3", "--no-nesterov", "--optimizer", "adamw", "--hflip", "--dtype", "bf16"])
    got = (config.lr, config.nesterov, config.optimizer, config.flip, config.dtype)
    assert got == (0.3, False, "adamw", True, "bf16")
    assert parse_args([]) == TrainConfig()
    assert not TrainConfig().flip  # digits: a mirrored digit is another glyph


def test_imagenet_preset_sets_the_recipe_and_scales_the_learning_rate():
    config = parse_args(["--preset", "imagenet-resnet50", "--data-dir", "imagenet"])
    recipe = (config.arch, config.small_stem, config.image_size, config.dtype, config.epochs, config.optimizer)
    assert recipe == ("resnet50", False, 224, "bf16", 90, "sgd")
    assert (config.momentum, config.nesterov, config.weight_decay, config.decay_bn_bias) == (0.9, True, 1e-4, False)
    assert (config.warmup_epochs, config.label_smoothing, config.batch_size, config.lr) == (5.0, 0.1, 256, 0.1)
    assert (config.dataset, config.crop, config.flip) == ("imagefolder", 0, True)
    bigger = parse_args(["--preset", "imagenet-resnet50", "--data-dir", "x", "--batch-size", "1024", "--epochs", "30"])
    assert (bigger.lr, bigger.epochs) == (0.4, 30)
    assert parse_args(["--preset", "imagenet-resnet50", "--data-dir", "x", "--lr", "0.3"]).lr == 0.3


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--optimizer", "lamb"], "invalid choice: 'lamb'"),
        (["--dataset", "cifar10"], "needs --data-dir"),
        (["--dataset", "imagefolder", "--data-dir", "x", "--crop-padding", "4"], "imagefolder crops on the CPU"),
        (["--preset", "imagenet-resnet5"], "invalid choice: 'imagenet-resnet5'"),
        (["--epochs", "2", "--warmup-epochs", "3"], "warmup_epochs"),
        (["--arch", "resnet19"], "invalid choice: 'resnet19'"),
    ],
)
def test_bad_flags_exit_with_a_sentence(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(flags)
    assert message in capsys.readouterr().err
