"""A resumed run keeps its image folder's split whatever was added or removed since it started."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import flax
import numpy as np
import pytest
from PIL import Image

from resnet_data.folders import SPLIT_FILE
from resnet_train.config import TrainConfig

FOLDER_RUN = dict(dataset="imagefolder", image_size=8, batch_size=4, workers=0)


def _images(folder: Path, names: range, shade: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(shade)
    for i in names:
        Image.fromarray(rng.integers(0, 256, (9, 9, 3), np.uint8) // shade).save(folder / f"{i}.png")


def test_resume_keeps_the_split_when_images_are_added_or_removed(tmp_path, caplog):
    from resnet_train import feeds, sharding

    data, run_dir = tmp_path / "data", tmp_path / "run"
    run_dir.mkdir()
    for shade, name in ((1, "ant"), (2, "bee")):
        _images(data / name, range(5), shade)  # 4 training and 1 held-out image per class
    config = TrainConfig(**FOLDER_RUN, data_dir=str(data), run_dir=str(run_dir))
    mesh = sharding.data_mesh()
    first = feeds.StreamedFeed(config, mesh)
    first.record(run_dir)  # as a run does once its run directory is checked
    first.close()
    recorded = json.loads((run_dir / SPLIT_FILE).read_bytes())
    assert first.train_size == 8 and len(recorded["test"]["names"]) == 2

    for shade, name in ((1, "ant"), (2, "bee")):
        _images(data / name, range(5, 10), shade)  # drawn afresh, these would move images between the splits
    (data / recorded["train"]["names"][0]).unlink()
    caplog.set_level(logging.WARNING, logger="resnet_train")
    resumed = feeds.StreamedFeed(TrainConfig(**{**config.__dict__, "resume": True}), mesh)
    try:
        warnings = [r.getMessage() for r in caplog.records if SPLIT_FILE in r.getMessage()]
        assert len(warnings) == 1 and "10 image(s) added since the run started are left out and 1 of" in warnings[0]
        assert resumed.train_size == first.train_size
        assert resumed.test_files.names.tolist() == first.test_files.names.tolist()
        for _ in resumed.train_batches(0, range(2), 4):  # one epoch
            pass
        assert resumed.skipped == 1  # the gone image, drawn once in the epoch
    finally:
        resumed.close()


def test_digits_resizes_only_the_images_a_run_uses_with_the_whole_splits_statistics(monkeypatch):
    from resnet_train import data

    resized: list[int] = []
    resize = data._resize
    monkeypatch.setattr(data, "_resize", lambda images, side: resized.append(len(images)) or resize(images, side))
    limited = data.load_dataset(TrainConfig(image_size=12, train_limit=32))
    whole = data.load_digits(12, 0.2)
    assert resized == [32, len(whole.test_labels), len(whole.train_labels), len(whole.test_labels)]
    assert limited.train_images.shape == (32, 12, 12, 3) and (limited.mean, limited.std) == (whole.mean, whole.std)
    source = data.load_digits(8, 0.2)  # no resize: the statistics are those of the images themselves
    assert (source.mean, source.std) == data.channel_stats(source.train_images) == (whole.mean, whole.std)


def test_digits_too_large_for_memory_is_refused_before_resizing(monkeypatch):
    from resnet_train import data

    used = 32 + len(data.load_digits(8, 0.2).test_labels)  # the kept training images and the held-out ones
    monkeypatch.setattr(data, "_resize", lambda *a: pytest.fail("resized before the memory check"))
    with pytest.raises(ValueError, match=rf"digits at --image-size 20000: {used} images of 20000x20000x3 would take "):
        data.load_dataset(TrainConfig(image_size=20000, train_limit=32))
    with pytest.raises(ValueError, match="lower --image-size or --train-limit"):
        data.load_dataset(TrainConfig(image_size=20000))


@flax.struct.dataclass
class _State:
    step: np.ndarray
    params: dict
    batch_stats: dict
    opt_state: dict
    skipped: np.ndarray


def _state(*layers: str) -> _State:
    params = {name: np.full(3, i, np.float32) for i, name in enumerate(layers)}
    return _State(np.asarray(2, np.int32), params, {}, {}, np.asarray(0, np.int32))


def test_a_checkpoint_of_another_model_is_one_sentence_naming_the_difference(tmp_path):
    from resnet_train.checkpoint import Checkpoints, IncompatibleCheckpointError

    saved = Checkpoints(tmp_path / "checkpoints", keep=2)
    saved.save(_state("conv", "fc"))
    saved.close()
    checkpoints = Checkpoints(tmp_path / "checkpoints", keep=2)
    try:
        fewer = (
            r"checkpoints/2: the saved arrays are not those of the model .*\(saved but not in the model: params\.fc\)"
        )
        with pytest.raises(IncompatibleCheckpointError, match=fewer + "; resume with the settings the run was saved"):
            checkpoints.restore_latest_good(_state("conv"))
        with pytest.raises(IncompatibleCheckpointError, match=r"\(in the model but not saved: params\.head\)"):
            checkpoints.restore_latest_good(_state("conv", "fc", "head"))
        assert float(checkpoints.restore_latest_good(_state("conv", "fc")).params["fc"][0]) == 1.0
    finally:
        checkpoints.close()


def _closed_loop_error() -> tuple[RuntimeError, object]:
    """What TensorStore hands sys.excepthook when a write ends after orbax's event loop has closed."""
    import asyncio

    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        return e, e.__traceback__.tb_next  # the frames inside asyncio, as when C code makes the call
    raise AssertionError("a closed loop accepted a call")


def test_a_full_disk_during_a_save_reports_no_closed_event_loop_tracebacks(tmp_path, capsys):
    import sys

    from resnet_train.checkpoint import Checkpoints

    Checkpoints(tmp_path / "checkpoints", keep=1).close()  # a run's checkpoints install the filter
    error, tb = _closed_loop_error()
    sys.excepthook(RuntimeError, error, tb)
    assert capsys.readouterr().err == ""
    other = RuntimeError("something else")
    sys.excepthook(RuntimeError, other, None)
    assert "RuntimeError: something else" in capsys.readouterr().err
