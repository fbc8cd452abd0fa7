"""resnet-train --api nnx: the NNX model and nnx.Optimizer train as the linen model does, with the same loop."""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import parity
import resnet_flax
from resnet_flax import nnx as flax_nnx
from resnet_flax.fused import fused
from resnet_flax.model import init_key
from resnet_train import feeds, nnx_steps, steps
from resnet_train.checkpoint import load_variables
from resnet_train.config import TrainConfig
from resnet_train.loop import fit
from resnet_train.optim import make_optimizer
from resnet_train.runlog import read_metrics

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _rel(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    a_, b_ = (np.concatenate([np.ravel(x).astype(np.float64) for x in t]) for t in (a, b))
    return float(np.linalg.norm(a_ - b_) / np.linalg.norm(b_))


def test_three_float64_steps_equal_the_linen_steps() -> None:
    """From the same initial weights, 3 steps (augmentation, Nesterov SGD with weight decay, fused BatchNorm)
    of the NNX step and the linen step give the same parameters and statistics to 1e-10."""
    config = TrainConfig(image_size=8, batch_size=4, crop_padding=1, hflip=True, warmup_epochs=0, lr=0.05)
    rng = np.random.default_rng(3)
    batches = [(rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, 4).astype(np.int32))]
    batches *= 3
    with jax.enable_x64(True):
        tx = make_optimizer(config, 3)
        # One block per stage (depth is not the point): every layer kind the steps train, half resnet18's compile.
        linen = resnet_flax.ResNet(
            resnet_flax.BasicBlock,
            (1, 1, 1, 1),
            num_classes=10,
            small_stem=True,
            dtype=jnp.float64,
            param_dtype=jnp.float64,
        )
        probe = jnp.zeros((1, 8, 8, 3), jnp.float64)
        variables = jax.jit(lambda k: linen.init(k, probe))(init_key(0))
        model = flax_nnx.fused(parity.linen_to_nnx(variables, dtype=jnp.float64))
        states = {
            "linen": steps.state_of(fused(linen), variables, tx, MEAN, STD),
            "nnx": nnx_steps.state_of(model, tx, MEAN, STD),
        }
        for api, module in (("linen", steps), ("nnx", nnx_steps)):
            step = jax.jit(lambda s, x, y, module=module: module.train_step(s, x, y, config))
            for images, labels in batches:
                states[api], metrics = step(states[api], images, labels)
                assert bool(metrics["finite"])
        got, want = (jax.device_get(states[api].variables()) for api in ("nnx", "linen"))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    moved = _rel(jax.tree.leaves(got["params"]), jax.tree.leaves(variables["params"]))
    assert moved > 1e-3  # the steps did change the weights
    assert _rel(jax.tree.leaves(got["params"]), jax.tree.leaves(want["params"])) <= 1e-10
    assert _rel(jax.tree.leaves(got["batch_stats"]), jax.tree.leaves(want["batch_stats"])) <= 1e-10
    assert int(got["batch_stats"]["conv1"]["1"]["num_batches_tracked"]) == 3


def test_build_model_follows_the_config() -> None:
    model = nnx.eval_shape(lambda: nnx_steps.build_model(TrainConfig(), 10, rngs=nnx.Rngs(0)))
    assert flax_nnx.is_fused(model) and model.small_stem and model.param_dtype == jnp.float32
    plain = nnx.eval_shape(lambda: nnx_steps.build_model(TrainConfig(fused_bn=False), 10, rngs=nnx.Rngs(0)))
    assert not flax_nnx.is_fused(plain)


@pytest.fixture(scope="module")
def nnx_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, dict]:
    """Two epochs of --api nnx with a NaN injected at step 2 (skipped), exported to PyTorch."""
    config = TrainConfig(
        api="nnx",
        image_size=8,
        train_limit=96,
        test_fraction=0.05,
        batch_size=16,
        epochs=2,
        progress=False,
        inject_nan_at_step=2,
        on_nonfinite="skip",
        run_dir=str(tmp_path_factory.mktemp("nnx")),
    )
    return config, fit(config)


def test_nnx_run_trains_skips_and_exports(nnx_run: tuple[TrainConfig, dict]) -> None:
    config, result = nnx_run
    assert (result["epochs"], result["steps"], result["skipped_updates"]) == (2, 12, 1)
    records = read_metrics(Path(config.run_dir))
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert result["export_rel_err"] <= 1e-5 and result["export_mismatched_predictions"] == 0
    variables = load_variables(result["checkpoint"])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))
    # The checkpoint holds the linen tree: the export and both APIs read it as they read a linen run's.
    exported = parity.load_checkpoint(result["export"], "nnx")
    for a, b in zip(jax.tree.leaves(parity.nnx_to_linen(exported)), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nnx_sigterm_saves_a_checkpoint_that_resumes_bit_exact(
    nnx_run: tuple[TrainConfig, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, result = nnx_run
    split = dataclasses.replace(config, run_dir=str(tmp_path), export=False)
    reading = feeds.InMemoryFeed.train_batches

    def interrupted(self: feeds.InMemoryFeed, epoch: int, steps: range, batch_size: int) -> Iterator:
        for i, batch in zip(steps, reading(self, epoch, steps, batch_size), strict=True):
            if epoch == 0 and i == 3:  # SIGTERM while step 3 (the fourth, of 12) trains
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(feeds.InMemoryFeed, "train_batches", interrupted)
    first = fit(split)
    assert (first["stopped"], first["steps"], Path(first["checkpoint"]).name) == ("SIGTERM", 4, "4")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(load_variables(first["checkpoint"])))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="api: 'nnx' -> 'linen'"):
        fit(dataclasses.replace(split, stop_after_epoch=0, resume=True, api="linen"))
    resumed = fit(dataclasses.replace(split, stop_after_epoch=0, resume=True))
    assert (resumed["steps"], resumed["skipped_updates"]) == (12, 1)
    a, b = load_variables(resumed["checkpoint"]), load_variables(result["checkpoint"])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
