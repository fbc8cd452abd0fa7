"""Training: it learns, resumes bit for bit, survives SIGTERM and NaNs, shards, and exports to PyTorch."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from conftest import TINY_FLAGS, TINY_RUN
from safetensors.torch import load_file

import parity
import resnet_flax
import resnet_torch
from resnet_flax.fused import fused_batch_norm2d
from resnet_train import data, runlog
from resnet_train.checkpoint import load_variables
from resnet_train.config import TrainConfig
from resnet_train.loop import NonFiniteLossError, fit
from resnet_train.optim import make_optimizer
from resnet_train.runlog import PLOT_FILE, read_metrics
from resnet_train.steps import build_model, create_train_state, train_step

REPO = Path(__file__).resolve().parents[1]


def _config(tmp: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY_RUN, "run_dir": str(tmp), **kw})


def _leaves(variables: dict) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(variables)]


def test_short_run_learns_and_records(straight):
    config, result = straight
    # 10 classes: chance is 0.1; 48 steps on 192 images reach far more on the 90 held-out digits.
    assert result["test_accuracy"] > 0.3
    assert (result["epochs"], result["steps"], result["stopped"], result["skipped_updates"]) == (4, 48, None, 0)
    records = [r for r in read_metrics(Path(config.run_dir)) if "epoch" in r]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["test_accuracy"] == result["test_accuracy"]
    assert records[-1]["test_top5_accuracy"] == result["test_top5_accuracy"] >= result["test_accuracy"]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    # Every --log-every (default 10) steps too, so the plot shows progress within an epoch.
    steps = [r for r in read_metrics(Path(config.run_dir)) if "epoch_progress" in r]
    assert [r["step"] for r in steps] == [10, 20, 30, 40]
    assert all(r.keys() >= {"loss", "accuracy", "lr", "images_per_s"} for r in steps)
    assert (Path(config.run_dir) / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(result["checkpoint"]).name == "48"


def test_export_loads_into_resnet_torch_with_the_same_predictions(straight):
    config, result = straight
    assert result["export_rel_err"] <= 1e-5 and result["export_mismatched_predictions"] == 0
    state_dict = load_file(result["export"])
    model = resnet_torch.resnet18(num_classes=10, small_stem=True)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    # Independent check: the torch model on fresh held-out images against the checkpointed Flax weights.
    ds = data.load_digits(config.image_size, config.test_fraction)
    variables = load_variables(result["checkpoint"])
    flax_model = resnet_flax.resnet18(num_classes=10, small_stem=True)
    x = ds.test_images[:50].astype(np.float32) / 255
    mean, std = np.asarray(ds.mean, np.float32), np.asarray(ds.std, np.float32)
    x = (x - mean.reshape(1, 1, 1, 3)) / std.reshape(1, 1, 1, 3)
    flax_logits = np.asarray(flax_model.apply(variables, x, train=False))
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert np.linalg.norm(flax_logits - torch_logits) / np.linalg.norm(torch_logits) <= 1e-5
    np.testing.assert_array_equal(flax_logits.argmax(-1), torch_logits.argmax(-1))
    assert type(parity.load_checkpoint(result["export"], "torch")).__name__ == "ResNet"


def test_resume_is_bit_exact(straight, tmp_path):
    config, result = straight
    split = dataclasses.replace(config, run_dir=str(tmp_path), export=False, stop_after_epoch=2)
    first = fit(split)
    assert (first["epochs"], first["steps"]) == (2, 24)
    with pytest.raises(ValueError, match="--resume"):
        fit(split)
    second = fit(dataclasses.replace(split, stop_after_epoch=0, resume=True))
    assert (second["epochs"], second["steps"]) == (4, 48)
    resumed, uninterrupted = load_variables(second["checkpoint"]), load_variables(result["checkpoint"])
    for a, b in zip(_leaves(resumed), _leaves(uninterrupted), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="lr: 0.02 -> 0.1"):
        fit(dataclasses.replace(split, resume=True, lr=0.1))
    # A run saved before config had fused_bn trained the plain model: it resumes as that, and only as that.
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["fused_bn"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="fused_bn: False -> True"):
        fit(dataclasses.replace(split, stop_after_epoch=0, resume=True))
    assert fit(dataclasses.replace(split, stop_after_epoch=0, resume=True, fused_bn=False))["steps"] == 48


def test_bfloat16_step_keeps_float32_params():
    config = TrainConfig(image_size=8, batch_size=4, dtype="bf16", hflip=True, crop_padding=1, warmup_epochs=0)
    state = create_train_state(config, 10, make_optimizer(config, 3), (0.5, 0.4, 0.3), (0.2, 0.3, 0.25))
    rng = np.random.default_rng(11)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    new, metrics = jax.jit(lambda s, x, y: train_step(s, x, y, config))(state, images, np.arange(4, dtype=np.int32))
    assert bool(metrics["finite"]) and metrics["loss"].dtype == np.float32
    dtypes = {x.dtype for x in jax.tree.leaves(new.variables()) if np.issubdtype(x.dtype, np.floating)}
    assert dtypes == {np.dtype(np.float32)}
    moved = [not np.array_equal(a, b) for a, b in zip(_leaves(state.params), _leaves(new.params), strict=True)]
    assert all(moved)


def test_training_uses_the_fused_batchnorm_unless_asked_not_to():
    """tests/test_fused.py proves the fused model computes the plain one's function and gradient."""
    assert build_model(TrainConfig(), 10).norm is fused_batch_norm2d
    plain = build_model(TrainConfig(fused_bn=False), 10)
    assert type(plain) is resnet_flax.ResNet and plain == resnet_flax.resnet18(num_classes=10, small_stem=True)


def test_nan_loss_stops_naming_the_step(tmp_path):
    with pytest.raises(NonFiniteLossError, match="at step 3 "):
        fit(_config(tmp_path, epochs=2, inject_nan_at_step=3, export=False))
    assert list((tmp_path / "checkpoints").iterdir()) == []  # the bad update never reached a checkpoint


def test_nan_loss_skip_mode_counts_and_keeps_checkpoints_finite(tmp_path):
    # The program of test_nan_loss_stops_naming_the_step (the same schedule and step to poison): compiled once.
    config = _config(tmp_path, epochs=2, stop_after_epoch=1, inject_nan_at_step=3, on_nonfinite="skip", export=False)
    result = fit(config)
    assert (result["skipped_updates"], result["steps"]) == (1, 12)
    assert read_metrics(tmp_path)[-1]["skipped_updates"] == 1
    assert all(np.isfinite(x).all() for x in _leaves(load_variables(result["checkpoint"])))


# Run as `python -m resnet_train.main`, with every import of torch refused.
WITHOUT_TORCH = textwrap.dedent(
    """
    import runpy, sys

    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torch":
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockTorch())
    sys.argv[0] = "resnet-train"
    runpy.run_module("resnet_train.main", run_name="__main__")
    """
)


def test_sigterm_saves_a_loadable_checkpoint_and_a_run_without_export_needs_no_torch(tmp_path):
    """The process gets the signal mid-run and exits 0 with a checkpoint (test_train_nnx.py stops an NNX run so,
    in-process); torch cannot be imported in it, which a run with --no-export never needs."""
    # The straight run's program (TINY_RUN, 4 epochs), compiled once per session; a step line from the first step
    # on, so the signal arrives with most of the 48 steps to go.
    flags = [*TINY_FLAGS, "--epochs", "4", "--log-every", "1", "--no-export", "--run-dir", str(tmp_path)]
    proc = subprocess.Popen(
        [sys.executable, "-c", WITHOUT_TORCH, *flags],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "metrics.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["stopped"] == "SIGTERM" and 1 <= result["steps"] < 48, err
    variables = load_variables(result["checkpoint"])
    assert Path(result["checkpoint"]).name == str(result["steps"])
    assert all(np.isfinite(x).all() for x in _leaves(variables))
    assert "Traceback" not in err


SHARDED_CHECK = textwrap.dedent(
    """
    import importlib, json, sys, jax, numpy as np
    import parity, resnet_flax
    from resnet_flax import nnx as flax_nnx
    from resnet_flax.fused import fused
    from resnet_train import sharding
    from resnet_train.config import TrainConfig
    from resnet_train.optim import make_optimizer

    config = TrainConfig(image_size=16, batch_size=8, epochs=2, seed=3, crop_padding=2, hflip=True, lr=0.05)
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 8).astype(np.int32)
    flat = lambda t: np.concatenate([np.ravel(x).astype(np.float64) for x in jax.tree.leaves(t)])
    # One block per stage (the sharding, not the depth, is the point): every layer kind, half resnet18's compile.
    model = fused(resnet_flax.ResNet(resnet_flax.BasicBlock, (1, 1, 1, 1), num_classes=10, small_stem=True))
    variables = jax.jit(model.init)(jax.random.key(3), np.zeros((1, 16, 16, 3), np.float32))
    tx, mean, std = make_optimizer(config, 4), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    nnx_model = flax_nnx.fused(parity.linen_to_nnx(variables))
    states = {
        "resnet_train.steps": lambda steps: steps.state_of(model, variables, tx, mean, std),
        "resnet_train.nnx_steps": lambda steps: steps.state_of(nnx_model, tx, mean, std),
    }
    reports, out = {}, {}
    # resnet_train.steps (linen) on 1 and on 4 devices, then resnet_train.nnx_steps on 4 against linen's 1 (the two
    # APIs' steps are the same function: test_train_nnx.py).
    for name in sys.argv[1:]:
        steps = importlib.import_module(name)
        fresh = states[name](steps)
        for n in (4,) if out else (1, 4):
            mesh = sharding.data_mesh(jax.devices()[:n])
            state = sharding.replicate(fresh, mesh)
            rep = sharding.replicated(mesh)
            step = jax.jit(lambda s, x, y: steps.train_step(s, x, y, config), out_shardings=(rep, rep))
            for _ in range(2):
                state, metrics = step(state, *sharding.put_batch(mesh, images, labels))
            out[n] = (jax.device_get(state.variables()), float(metrics["loss"]))
        a, b = flat(out[4][0]), flat(out[1][0])
        reports[name] = dict(rel=float(np.linalg.norm(a - b) / np.linalg.norm(b)), loss=[out[1][1], out[4][1]])
    print(json.dumps(dict(devices=len(jax.devices()), reports=reports)))
    """
)


def test_sharded_step_equals_single_device_step():
    """Both APIs' steps, in one process with 4 CPU devices."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    modules = ["resnet_train.steps", "resnet_train.nnx_steps"]
    run = subprocess.run(
        [sys.executable, "-c", SHARDED_CHECK, *modules],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4 and sorted(report["reports"]) == sorted(modules)
    for name, got in report["reports"].items():
        assert got["rel"] <= 1e-6, name
        assert got["loss"][0] == pytest.approx(got["loss"][1], rel=1e-6), name


def test_metrics_are_appended_and_a_torn_last_line_is_left_out(tmp_path):
    runlog.append_metrics(tmp_path, {"step": 1})
    path = tmp_path / runlog.METRICS_FILE
    inode = path.stat().st_ino
    runlog.append_metrics(tmp_path, {"step": 2})
    assert path.stat().st_ino == inode  # appended in place, not a new file renamed over the old
    with path.open("ab") as f:
        f.write(b'{"loss": 0.5, "st')  # what a crash in the middle of a write can leave
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 2}]
    runlog.keep_metrics_until(tmp_path, 10)  # a run starting in the folder drops the torn line
    runlog.append_metrics(tmp_path, {"step": 3})
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 2}, {"step": 3}]
    assert path.read_text().count("\n") == 3
