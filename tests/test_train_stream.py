"""Training through a streamed image folder and on synthetic batches: resume mid-epoch bit for bit from the
iterator state in the checkpoint, classes recorded, unreadable files counted, top-1 and top-5 reported."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from resnet_train import feeds
from resnet_train.checkpoint import load_variables
from resnet_train.config import TrainConfig
from resnet_train.loop import fit
from resnet_train.runlog import read_metrics
from resnet_train.steps import TrainState, eval_step

CLASSES = ("ant", "bee", "cat")
# 3 classes x 8 images + 1 unreadable file: 3 steps of 8 per epoch.
STREAM = dict(
    dataset="imagefolder", image_size=12, batch_size=8, epochs=2, workers=0, progress=False, log_every=1, lr=0.05
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """train/ and val/ with images of several sizes and modes, and one file that is no image."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    modes = ("RGB", "L", "CMYK", "RGBA", "P", "RGB", "I;16", "RGB")
    for split, n in (("train", 8), ("val", 3)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                mode = modes[i]
                shade = rng.integers(0, 256, (14 + i, 17 + 2 * c, 3), dtype=np.uint8) // (c + 1)
                image = Image.fromarray(shade).convert("L" if mode == "I;16" else mode)
                if mode == "I;16":
                    image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
                suffix = ".jpg" if mode in ("RGB", "L", "CMYK") else ".png"
                image.save(root / split / name / f"{i}{suffix}")
    (root / "train" / "bee" / "broken.jpg").write_bytes(b"\xff\xd8\xff this is not a jpeg")
    return root


def _config(data_dir: Path, run_dir: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**STREAM, "data_dir": str(data_dir), "run_dir": str(run_dir), **kw})


@pytest.fixture(scope="module")
def stream_run(data_dir, tmp_path_factory) -> tuple[TrainConfig, dict]:
    """Two epochs of STREAM in one go, exported."""
    config = _config(data_dir, tmp_path_factory.mktemp("stream"))
    return config, fit(config)


def test_stream_run_records_classes_top5_steps_and_skipped_files(stream_run):
    config, result = stream_run
    run_dir = Path(config.run_dir)
    assert (result["steps"], result["epochs"], result["dataset"]) == (6, 2, "imagefolder")
    assert 1 <= result["skipped_images"] <= 2  # the unreadable file, once per epoch it is drawn in
    assert result["test_top5_accuracy"] == 1.0 >= result["test_accuracy"]  # 3 classes: always in the top 5
    assert json.loads((run_dir / "config.json").read_text())["class_names"] == list(CLASSES)
    with safe_open(result["export"], "np") as f:
        assert json.loads(f.metadata()["class_names"]) == list(CLASSES)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "epoch_progress" in r] == [1, 2, 3, 4, 5, 6]
    epochs = [r for r in records if "epoch" in r]
    assert [r["test_images"] for r in epochs] == [9, 9] and all("test_top5_accuracy" in r for r in epochs)
    saved = Path(result["checkpoint"])
    assert json.loads((saved / feeds.DATA_ITEM / "process_0-of-1.json").read_text()) == {"next_batch": 6}


def test_stream_resume_mid_epoch_continues_with_the_next_batch_bit_for_bit(stream_run, tmp_path, monkeypatch):
    config, result = stream_run
    split = dataclasses.replace(config, run_dir=str(tmp_path), export=False)
    reading = feeds.StreamedFeed.train_batches

    def interrupted(self, epoch, steps, batch_size):
        for batch in reading(self, epoch, steps, batch_size):
            if self.stream.get_state()["next_batch"] == 4:  # SIGTERM while step 4 (of 6) trains
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(feeds.StreamedFeed, "train_batches", interrupted)
    first = fit(split)
    assert (first["stopped"], first["steps"]) == ("SIGTERM", 4)
    state = json.loads((Path(first["checkpoint"]) / feeds.DATA_ITEM / "process_0-of-1.json").read_text())
    assert state == {"next_batch": 4}
    monkeypatch.undo()
    second = fit(dataclasses.replace(split, resume=True, workers=1))  # another worker count resumes the same
    assert (second["steps"], second["stopped"]) == (6, None)
    resumed, uninterrupted = load_variables(second["checkpoint"]), load_variables(result["checkpoint"])
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    steps = [r["step"] for r in read_metrics(tmp_path) if "epoch_progress" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_folder_whose_classes_changed(data_dir, tmp_path):
    config = _config(data_dir, tmp_path / "run", epochs=1, export=False)
    saved = tmp_path / "run"
    saved.mkdir()
    (saved / "config.json").write_text(json.dumps({**dataclasses.asdict(config), "class_names": ["ant", "bee"]}))
    with pytest.raises(ValueError, match="classes are not the run's .*added or removed: cat"):
        fit(dataclasses.replace(config, resume=True))


def test_synthetic_batches_train_with_no_loader(tmp_path):
    config = TrainConfig(
        dataset="synthetic", image_size=8, batch_size=4, train_limit=12, epochs=1, warmup_epochs=0,
        progress=False, export=False, run_dir=str(tmp_path), log_every=1,
    )  # fmt: skip
    result = fit(config)
    assert (result["dataset"], result["steps"], result["skipped_images"]) == ("synthetic", 3, 0)
    losses = [r["loss"] for r in read_metrics(tmp_path) if "epoch_progress" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert json.loads((tmp_path / "config.json").read_text())["class_names"][:2] == ["0", "1"]


def test_eval_step_counts_top1_and_top5():
    logits = jnp.asarray(
        [
            [9.0, 8, 7, 6, 5, 4, 3],  # label 0: top-1
            [9.0, 8, 7, 6, 5, 4, 3],  # label 4: top-5 only
            [9.0, 8, 7, 6, 5, 4, 3],  # label 6: neither
            [1.0, 2, 3, 4, 5, 6, 7],  # label 6: top-1, but masked out
        ]
    )
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params={}, batch_stats={}, opt_state=(), skipped=jnp.zeros((), jnp.int32),
        apply_fn=lambda variables, x, train: logits, tx=None, mean=(0.0,) * 3, std=(1.0,) * 3,
    )  # fmt: skip
    out = eval_step(state, jnp.zeros((4, 2, 2, 3), jnp.uint8), jnp.asarray([0, 4, 6, 6]), jnp.asarray([1, 1, 1, 0]) > 0)
    assert (int(out["correct"]), int(out["correct5"]), int(out["count"])) == (1, 2, 3)
