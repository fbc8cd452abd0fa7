"""The training loop: epochs of sharded steps, evaluation, checkpoints, signals, export."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from resnet_arch import NNX

from . import nnx_steps, runlog, sharding, steps
from .checkpoint import Checkpoints
from .config import RESUMABLE_CHANGES, TrainConfig, saved_config
from .data import Dataset, epoch_permutation, load_dataset, steps_per_epoch
from .export import EXPORT_RTOL, ExportCancelled, ExportCheck, ExportMismatchError, export_torch, verify_export
from .optim import make_optimizer, schedule
from .signals import StopRequest, catch_stop_signals
from .steps import TrainState

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
EXPORT_FILE = "model.safetensors"
# XLA on CPU cannot reuse donated buffers and warns; elsewhere donation halves the state's memory.
NO_DONATION_BACKENDS = ("cpu",)


class NonFiniteLossError(RuntimeError):
    """The loss, a gradient or the update was NaN/inf and the run was told to stop."""


def _steps(config: TrainConfig) -> Any:
    """The module of state and step functions for the config's Flax API (the same names in both)."""
    return nnx_steps if config.api == NNX else steps


def _check_run_dir(run_dir: Path, config: TrainConfig, checkpoints: Checkpoints) -> None:
    """Refuse to mix runs: a new run needs an empty run dir, a resumed one the same settings."""
    saved_path = run_dir / runlog.CONFIG_FILE
    if not config.resume:
        if checkpoints.latest_step() is not None:
            raise ValueError(
                f"{run_dir} already holds a run (checkpoint at step {checkpoints.latest_step()}): "
                "pass --resume to continue it, or --run-dir for a new run"
            )
    elif saved_path.exists():
        saved = saved_config(saved_path.read_text())
        ours = dataclasses.asdict(config)
        changed = sorted(k for k in ours if k not in RESUMABLE_CHANGES and saved.get(k) != ours[k])
        if changed:
            diff = ", ".join(f"{k}: {saved.get(k)!r} -> {ours[k]!r}" for k in changed)
            raise ValueError(f"--resume with settings that change the result ({diff}); use the run's own settings")


def _prepare_run_dir(run_dir: Path) -> None:
    """Create the run directory, or say in a sentence why it cannot be one."""
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"--run-dir {run_dir} is a file, not a folder")
    run_dir.mkdir(parents=True, exist_ok=True)


def _restore(config: TrainConfig, checkpoints: Checkpoints, state: TrainState) -> TrainState:
    """With --resume, the newest intact checkpoint's state; without one, the fresh state, saying so."""
    if not config.resume:
        return state
    restored = checkpoints.restore_latest_good(state)
    if restored is None:
        log.warning("--resume: no complete checkpoint in %s; starting from step 0", checkpoints.directory)
        return state
    log.info("resumed from step %d (%s)", int(restored.step), checkpoints.path(int(restored.step)))
    return restored


def evaluate(
    eval_fn: Any, state: TrainState, images: np.ndarray, labels: np.ndarray, batch: int, mesh: Mesh
) -> dict[str, float]:
    """Mean loss and accuracy over a whole split; the last batch is padded and masked out."""
    n = len(labels)
    pad = (-n) % batch
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    mask = np.arange(n + pad) < n
    totals = {"loss": 0.0, "correct": 0, "count": 0}
    for start in range(0, n + pad, batch):
        part = slice(start, start + batch)
        out = jax.device_get(eval_fn(state, *sharding.put_batch(mesh, images[part], labels[part], mask[part])))
        for k in totals:
            totals[k] += out[k].item()
    return {"loss": totals["loss"] / totals["count"], "accuracy": totals["correct"] / totals["count"]}


def _export(config: TrainConfig, state: TrainState, ds: Dataset, run_dir: Path, stop: StopRequest) -> dict[str, Any]:
    """Write the PyTorch checkpoint, verified on the test set against the float32 Flax model before it is in place.

    A file that fails the check, or whose check a stop signal interrupts, never reaches its path.
    """
    variables = jax.device_get(state.variables())
    meta = {
        "arch": config.arch,
        "small_stem": config.small_stem,
        "image_size": config.image_size,
        "mean": list(ds.mean),
        "std": list(ds.std),
        "input": "NCHW RGB, x / 255 normalised by mean/std",
    }
    path = run_dir / EXPORT_FILE
    # Verify the float32 weights at full precision (no TF32 on GPUs), whatever dtype trained them.
    forward = _steps(config).eval_forward(config, ds.num_classes, jnp.float32, jax.lax.Precision.HIGHEST)
    checks: list[ExportCheck] = []

    def verify(written: Path) -> None:
        check = verify_export(
            written, forward, variables, ds.test_images, ds.mean, ds.std, lambda: stop.signal_name is not None
        )
        if not check.ok:
            raise ExportMismatchError(
                f"export check failed: resnet_torch with the exported weights differs from the Flax model on the test "
                f"set (relative logit error {check.rel_err:.2e}, tolerance {EXPORT_RTOL:.0e}; "
                f"{check.mismatched_predictions} of {check.images} predictions differ); {path} was not written"
            )
        checks.append(check)

    try:
        export_torch(variables, path, meta, verify)
    except ExportCancelled:
        log.warning("%s: export check interrupted by %s; the file was not written", path, stop.signal_name)
        return {"export": None}
    [check] = checks
    return {
        "export": str(path),
        "export_rel_err": check.rel_err,
        "export_mismatched_predictions": check.mismatched_predictions,
    }


@dataclasses.dataclass
class Run:
    """What one invocation of the loop works with, fixed once set up."""

    config: TrainConfig
    lead: bool  # process 0: writes metrics, the plot and the export
    mesh: Mesh
    ds: Dataset
    per_epoch: int
    run_dir: Path
    checkpoints: Checkpoints
    train_fn: Any
    eval_fn: Any


@dataclasses.dataclass
class Progress:
    """What the loop has done so far in this invocation."""

    step: int
    result: dict[str, Any]
    stopped: str | None = None


def setup(config: TrainConfig, cleanup: contextlib.ExitStack) -> tuple[Run, TrainState]:
    """Join the job, load the data, lock and check the run directory and build (or restore) the state and steps.

    The run directory stays locked until ``cleanup`` closes (process 0 holds the lock).
    """
    sharding.initialize(config)
    mesh = sharding.data_mesh()
    sharding.check_batch(config.batch_size, mesh)
    lead = jax.process_index() == 0
    run_dir = Path(config.run_dir)
    _prepare_run_dir(run_dir)
    if lead:
        cleanup.enter_context(runlog.locked(run_dir))
    ds = load_dataset(config)
    per_epoch = steps_per_epoch(len(ds.train_labels), config.batch_size)
    checkpoints = Checkpoints(run_dir / CHECKPOINT_DIR, config.keep_checkpoints)
    _check_run_dir(run_dir, config, checkpoints)

    tx = make_optimizer(config, per_epoch)
    fns = _steps(config)
    state = sharding.replicate(fns.create_train_state(config, ds.num_classes, tx, ds.mean, ds.std), mesh)
    state = _restore(config, checkpoints, state)
    if lead:  # only now: a failed resume leaves the run's record as it was
        runlog.keep_metrics_until(run_dir, int(jax.device_get(state.step)))
        runlog.write_atomic(run_dir / runlog.CONFIG_FILE, config.to_json().encode())
    rep = sharding.replicated(mesh)
    donate = () if jax.default_backend() in NO_DONATION_BACKENDS else (0,)
    train_fn = jax.jit(
        functools.partial(fns.train_step, config=config), out_shardings=(rep, rep), donate_argnums=donate
    )
    eval_fn = jax.jit(fns.eval_step, out_shardings=rep)
    return Run(config, lead, mesh, ds, per_epoch, run_dir, checkpoints, train_fn, eval_fn), state


def train_epoch(run: Run, state: TrainState, epoch: int, progress: Progress, stop: StopRequest) -> TrainState:
    """Train one epoch (or its rest, on resume), then evaluate, record and checkpoint it.

    A stop signal ends the epoch at the next step boundary with a checkpoint (``progress.stopped``).
    """
    config, batch, per_epoch = run.config, run.config.batch_size, run.per_epoch
    perm = epoch_permutation(config.seed, epoch, len(run.ds.train_labels))
    first = progress.step - epoch * per_epoch
    loss_sum, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
    bar = tqdm(
        total=per_epoch,
        initial=first,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        file=sys.stderr,
        disable=not (config.progress and run.lead),
        leave=True,
    )
    for i in range(first, per_epoch):
        idx = perm[i * batch : (i + 1) * batch]
        x, y = sharding.put_batch(run.mesh, run.ds.train_images[idx], run.ds.train_labels[idx])
        state, metrics = run.train_fn(state, x, y)
        m = jax.device_get(metrics)
        if not m["finite"]:
            if config.on_nonfinite == "stop":
                raise NonFiniteLossError(
                    f"non-finite loss, gradient or update (loss {float(m['loss'])}) at step {progress.step} "
                    f"(epoch {epoch + 1}); the update was not applied; {_saved_so_far(run.checkpoints)}; "
                    "--on-nonfinite skip skips such updates"
                )
            log.warning("non-finite loss, gradient or update at step %d: update skipped", progress.step)
        else:
            loss_sum += float(m["loss"]) * batch
            correct += int(m["correct"])
            seen += batch
        progress.step += 1
        rate = (i + 1 - first) * batch / (time.perf_counter() - t0)
        seen_ = max(seen, 1)
        bar.set_postfix(loss=f"{loss_sum / seen_:.4f}", acc=f"{correct / seen_:.4f}", img_s=f"{rate:.1f}")
        bar.update(1)
        if stop.signal_name:
            break
    bar.close()
    if stop.signal_name:
        progress.stopped = stop.signal_name
        path = run.checkpoints.save(state)
        log.warning("%s: saved step %d to %s", progress.stopped, progress.step, path)
        progress.result["checkpoint"] = str(path)
        return state
    seconds = time.perf_counter() - t0
    test = evaluate(run.eval_fn, state, run.ds.test_images, run.ds.test_labels, batch, run.mesh)
    record = {
        "epoch": epoch + 1,
        "step": progress.step,
        "lr": float(schedule(config, per_epoch)(progress.step - 1)),
        "train_loss": loss_sum / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "images_per_s": (per_epoch - first) * batch / seconds,
        "epoch_seconds": seconds,
        "skipped_updates": int(jax.device_get(state.skipped)),
    }
    if run.lead:
        runlog.append_metrics(run.run_dir, record)
    progress.result["checkpoint"] = str(run.checkpoints.save(state, {"test_accuracy": test["accuracy"]}))
    progress.result.update(test_accuracy=test["accuracy"], test_loss=test["loss"], images_per_s=record["images_per_s"])
    return state


def _saved_so_far(checkpoints: Checkpoints) -> str:
    """Which checkpoint holds the run so far (every saved state passed the step's finiteness check)."""
    step = checkpoints.latest_step()
    if step is None:
        return "no checkpoint has been saved yet"
    return f"the latest checkpoint, {checkpoints.path(step)}, holds the finite state of step {step}"


def finish(run: Run, state: TrainState, progress: Progress, started: float) -> dict[str, Any]:
    """Export (unless stopped early), plot, and assemble the summary `resnet-train` prints."""
    config, result = run.config, progress.result
    checkpoints = run.checkpoints
    if "checkpoint" not in result and checkpoints.latest_step() is not None:
        result["checkpoint"] = str(checkpoints.path(checkpoints.latest_step()))
    if progress.stopped is None and run.lead and config.export:
        with catch_stop_signals() as stop:  # the one fit holds: a signal cancels the export check
            result.update(_export(config, state, run.ds, run.run_dir, stop))
        progress.stopped = stop.signal_name
    plot = runlog.plot_curves(run.run_dir) if run.lead else None
    result.update(
        epochs=progress.step // run.per_epoch,
        steps=progress.step,
        seconds=round(time.perf_counter() - started, 2),
        skipped_updates=int(jax.device_get(state.skipped)),
        stopped=progress.stopped,
        devices=run.mesh.devices.size,
        dataset=run.ds.name,
        arch=config.arch,
        run_dir=str(run.run_dir),
        plot=str(plot) if plot else None,
    )
    result.setdefault("export", None)
    return result


def fit(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume) as config says; returns the summary `resnet-train` prints as its last line.

    From the first line to the last, SIGTERM/SIGINT stop the run at the next safe point (a signal
    during setup: before the first step) and the run directory is locked against a second run.
    """
    started = time.perf_counter()
    with catch_stop_signals() as stop, contextlib.ExitStack() as cleanup:
        run, state = setup(config, cleanup)
        step = int(jax.device_get(state.step))
        history = runlog.read_metrics(run.run_dir)
        progress = Progress(step, {"test_accuracy": history[-1]["test_accuracy"] if history else None})
        progress.stopped = stop.signal_name
        try:
            for epoch in range(step // run.per_epoch, config.stop_after_epoch or config.epochs):
                if progress.stopped:
                    break
                state = train_epoch(run, state, epoch, progress, stop)
        finally:
            run.checkpoints.wait()
            run.checkpoints.close()
        return finish(run, state, progress, started)
