"""The training loop: epochs of sharded steps, evaluation, checkpoints, signals, export.

The steps' metrics stay on the device: the loop fetches them every ``--log-every`` steps and at the
end of an epoch, and checks whether step N was finite while step N+1 runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh
from tqdm import tqdm

from parity.conversion.atomic import stale_temporaries

from . import finetune, runlog, sharding
from .api import TrainStateLike, step_functions
from .checkpoint import Checkpoints
from .config import RESUMABLE_CHANGES, TrainConfig, saved_config
from .data import steps_per_epoch
from .export import export_run, export_target
from .feeds import Feed, open_feed
from .finetune import SourceRecord
from .optim import make_optimizer, schedule
from .signals import StopRequest, catch_stop_signals
from .tallies import Tally

Metrics = dict[str, jax.Array]

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
# XLA on CPU cannot reuse donated buffers and warns; elsewhere donation halves the state's memory.
NO_DONATION_BACKENDS = ("cpu",)


class ProcessLostError(RuntimeError):
    """In a multi-process run, another process stopped answering in the middle of a step."""


class NonFiniteLossError(RuntimeError):
    """The loss, a gradient or the update was NaN/inf and the run was told to stop."""


def _check_run_dir(run_dir: Path, config: TrainConfig, checkpoints: Checkpoints, class_names: tuple[str, ...]) -> None:
    """Refuse to mix runs: a new run needs an empty run dir, a resumed one the same settings and classes."""
    saved_path = run_dir / runlog.CONFIG_FILE
    if not config.resume:
        if checkpoints.latest_step() is not None:
            raise ValueError(
                f"{run_dir} already holds a run (checkpoint at step {checkpoints.latest_step()}): "
                "pass --resume to continue it, or --run-dir for a new run"
            )
    elif not saved_path.exists():
        if checkpoints.latest_step() is not None:
            raise ValueError(
                f"--resume: {saved_path} is missing, so this run's settings cannot be checked against the ones "
                "its checkpoints were trained with; put it back, or start a new run in another --run-dir"
            )
    else:
        saved = saved_config(saved_path)
        ours = dataclasses.asdict(config)
        changed = sorted(k for k in ours if k not in RESUMABLE_CHANGES and saved.get(k) != ours[k])
        if changed:
            diff = ", ".join(f"{k}: {saved.get(k)!r} -> {ours[k]!r}" for k in changed)
            raise ValueError(f"--resume with settings that change the result ({diff}); use the run's own settings")
        runlog.check_class_names(saved, class_names)


def _prepare_run_dir(run_dir: Path) -> None:
    """Create the run directory, or say in a sentence why it cannot be one."""
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"--run-dir {run_dir} is a file, not a folder")
    run_dir.mkdir(parents=True, exist_ok=True)


def _initial_state(run: Run, tx: Any) -> tuple[TrainStateLike, SourceRecord | None]:
    """With --resume, the newest intact checkpoint's state (and the data's position) and the run's record of
    its source weights; otherwise (or with no intact checkpoint, saying so) the state at step 0: fresh, or from
    --init-from's weights, read now."""
    config, fns = run.config, step_functions(run.config.api)

    def fresh(init: dict[str, Any] | None = None) -> TrainStateLike:
        state = fns.create_train_state(config, run.ds.num_classes, tx, run.ds.mean, run.ds.std, init)
        return sharding.replicate(state, run.mesh)

    if config.resume and run.checkpoints.latest_step() is not None:
        restored = run.checkpoints.restore_latest_good(fresh(), run.ds.restore_items())
        if restored is not None:
            log.info("resumed from step %d (%s)", int(restored.step), run.checkpoints.path(int(restored.step)))
            return restored, finetune.saved_record(run.run_dir)
    if config.resume:
        log.warning("--resume: no complete checkpoint in %s; starting from step 0", run.checkpoints.directory)
    if not config.init_from:
        return fresh(), None
    init, record = finetune.read_source(config.init_from, config.arch, config.small_stem, run.ds.num_classes)
    return fresh(init), record


def evaluate(
    eval_fn: Callable[..., Metrics], state: TrainStateLike, batches: Iterable[tuple[jax.Array, ...]]
) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy over (images, labels, mask) batches of a whole split."""
    totals = {"loss": 0.0, "correct": 0, "correct5": 0, "count": 0}
    for batch in batches:
        out = jax.device_get(eval_fn(state, *batch))
        for k in totals:
            totals[k] += out[k].item()
    n = totals["count"]
    return {"loss": totals["loss"] / n, "accuracy": totals["correct"] / n, "top5": totals["correct5"] / n, "images": n}


@dataclasses.dataclass
class Run:
    """What one invocation of the loop works with, fixed once set up."""

    config: TrainConfig
    lead: bool  # process 0: writes metrics, the plot and the export
    mesh: Mesh
    ds: Feed
    per_epoch: int
    run_dir: Path
    checkpoints: Checkpoints
    train_fn: Callable[..., tuple[TrainStateLike, Metrics]]
    eval_fn: Callable[..., Metrics]
    source: SourceRecord | None = None  # --init-from's weights, as the run recorded them


@dataclasses.dataclass
class Progress:
    """What the loop has done so far in this invocation."""

    step: int
    result: dict[str, Any]
    stopped: str | None = None


def setup(config: TrainConfig, cleanup: contextlib.ExitStack) -> tuple[Run, TrainStateLike]:
    """Join the job, open the data, lock and check the run directory and build (or restore) the state and steps.

    The run directory stays locked until ``cleanup`` closes (process 0 holds the lock).
    """
    cleanup.enter_context(sharding.initialize(config))
    runlog.name_process(jax.process_index(), jax.process_count())
    mesh = sharding.data_mesh()
    sharding.check_batch(config.batch_size, mesh)
    lead = jax.process_index() == 0
    run_dir = Path(config.run_dir)
    _prepare_run_dir(run_dir)
    if lead:
        cleanup.enter_context(runlog.locked(run_dir))
        for stale in stale_temporaries(run_dir):  # a write a killed run never finished; the lock says it is ours
            log.warning("%s: removing the unfinished file a stopped run left", stale)
            stale.unlink()
    ds = cleanup.enter_context(contextlib.closing(open_feed(config, mesh)))
    per_epoch = steps_per_epoch(ds.train_size, config.batch_size)
    checkpoints = Checkpoints(run_dir / CHECKPOINT_DIR, config.keep_checkpoints)
    _check_run_dir(run_dir, config, checkpoints, ds.class_names)

    fns = step_functions(config.api)
    rep = sharding.replicated(mesh)
    donate = () if jax.default_backend() in NO_DONATION_BACKENDS else (0,)
    train_fn = jax.jit(
        functools.partial(fns.train_step, config=config), out_shardings=(rep, rep), donate_argnums=donate
    )
    eval_fn = jax.jit(fns.eval_step, out_shardings=rep)
    run = Run(config, lead, mesh, ds, per_epoch, run_dir, checkpoints, train_fn, eval_fn)
    state, run.source = _initial_state(run, make_optimizer(config, per_epoch))
    export_target(config, run.source)  # a layout the weights cannot be written in is refused before training
    if lead:  # only now: a failed resume leaves the run's record as it was
        runlog.keep_metrics_until(run_dir, int(jax.device_get(state.step)))
        record = config.to_json(class_names=list(ds.class_names), **finetune.record_json(run.source))
        runlog.write_atomic(run_dir / runlog.CONFIG_FILE, record.encode())
        ds.record(run_dir)
    return run, state


def train_epoch(run: Run, state: TrainStateLike, epoch: int, progress: Progress, stop: StopRequest) -> TrainStateLike:
    """Train one epoch (or its rest, on resume), then evaluate, record and checkpoint it.

    A stop signal ends the epoch at the next step boundary with a checkpoint (``progress.stopped``).
    """
    config, batch, per_epoch = run.config, run.config.batch_size, run.per_epoch
    first = progress.step - epoch * per_epoch
    started = time.perf_counter()
    epoch_tally, window = Tally(started), Tally(started)  # the whole epoch; the last --log-every steps
    bar = tqdm(
        total=per_epoch,
        initial=first,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        file=sys.stderr,
        disable=not (config.progress and run.lead),
        leave=True,
    )
    unchecked: tuple[int, Metrics] | None = None  # the step dispatched last, before its finiteness is known
    unfetched: list[Metrics] = []  # the metrics of the steps not yet tallied, on the device

    def fetch() -> None:
        """Check the last step, tally the unfetched steps' metrics (one transfer), show them on the bar."""
        nonlocal unchecked
        if unchecked is not None:
            _check_finite(run, *unchecked, epoch)
            unchecked = None
        for m in jax.device_get(unfetched):
            epoch_tally.add(m, batch)
            window.add(m, batch)
        unfetched.clear()
        loss, accuracy = epoch_tally.means()
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.4f}", img_s=f"{epoch_tally.rate(batch):.1f}")

    for x, y in run.ds.train_batches(epoch, range(first, per_epoch), batch):
        state, metrics = run.train_fn(state, x, y)
        if unchecked is not None:  # step N's flag, read while step N+1 runs
            _check_finite(run, *unchecked, epoch)
        unchecked = (progress.step, metrics)
        unfetched.append(metrics)
        progress.step += 1
        bar.update(1)
        if config.log_every and progress.step % config.log_every == 0:
            fetch()
            _record_steps(run, window, progress.step)
            window = Tally(time.perf_counter())
        if stop.should_stop(progress.step):
            break
    fetch()
    bar.close()
    if stop.signal_name:
        progress.stopped = stop.signal_name
        path = run.checkpoints.save(state, items=run.ds.checkpoint_items())
        log.warning("%s: saved step %d to %s", progress.stopped, progress.step, path)
        progress.result["checkpoint"] = str(path)
        return state
    seconds = time.perf_counter() - epoch_tally.start
    test = evaluate(run.eval_fn, state, run.ds.test_batches(batch))
    loss, accuracy = epoch_tally.means()
    record = {
        "epoch": epoch + 1,
        "step": progress.step,
        "lr": float(schedule(config, per_epoch)(progress.step - 1)),
        "train_loss": loss,
        "train_accuracy": accuracy,
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "test_top5_accuracy": test["top5"],
        "test_images": test["images"],
        "images_per_s": epoch_tally.rate(batch),
        "epoch_seconds": seconds,
        "skipped_updates": int(jax.device_get(state.skipped)),
        "skipped_images": run.ds.skipped,
    }
    if run.lead:
        runlog.append_metrics(run.run_dir, record)
    saved = run.checkpoints.save(state, {"test_accuracy": test["accuracy"]}, items=run.ds.checkpoint_items())
    progress.result["checkpoint"] = str(saved)
    progress.result.update(
        test_accuracy=test["accuracy"],
        test_top5_accuracy=test["top5"],
        test_loss=test["loss"],
        images_per_s=record["images_per_s"],
    )
    return state


def _check_finite(run: Run, step: int, metrics: Metrics, epoch: int) -> None:
    """Stop (``--on-nonfinite stop``) or warn when ``step`` had a non-finite loss, gradient or update
    (which its guard did not apply)."""
    if bool(metrics["finite"]):
        return
    if run.config.on_nonfinite == "stop":
        raise NonFiniteLossError(
            f"non-finite loss, gradient or update (loss {float(metrics['loss'])}) at step {step} "
            f"(epoch {epoch + 1}); the update was not applied; {_saved_so_far(run.checkpoints)}; "
            "--on-nonfinite skip skips such updates"
        )
    log.warning("non-finite loss, gradient or update at step %d: update skipped", step)


def _saved_so_far(checkpoints: Checkpoints) -> str:
    """Which checkpoint holds the run so far (every saved state passed the step's finiteness check)."""
    step = checkpoints.latest_step()
    if step is None:
        return "no checkpoint has been saved yet"
    return f"the latest checkpoint, {checkpoints.path(step)}, holds the finite state of step {step}"


def _record_steps(run: Run, window: Tally, step: int) -> None:
    """Log and (process 0) record the training metrics of the last --log-every steps."""
    loss, accuracy = window.means()
    lr = float(schedule(run.config, run.per_epoch)(step - 1))
    rate = window.rate(run.config.batch_size)
    record = {
        "step": step,
        "epoch_progress": step / run.per_epoch,
        "loss": loss,
        "accuracy": accuracy,
        "lr": lr,
        "images_per_s": rate,
    }
    if run.lead:
        log.info(
            "step %d (epoch %.2f): loss %.4f, accuracy %.4f, lr %.4g, %.1f images/s",
            step,
            step / run.per_epoch,
            loss,
            accuracy,
            lr,
            rate,
        )
        runlog.append_metrics(run.run_dir, record)


def finish(run: Run, state: TrainStateLike, progress: Progress, started: float) -> dict[str, Any]:
    """Export (unless stopped early), plot, and assemble the summary `resnet-train` prints."""
    config, result = run.config, progress.result
    checkpoints = run.checkpoints
    latest = checkpoints.latest_step()
    if "checkpoint" not in result and latest is not None:
        result["checkpoint"] = str(checkpoints.path(latest))
    if progress.stopped is None and run.lead and config.export:
        with catch_stop_signals() as stop:  # the one fit holds: a signal cancels the export check
            result.update(export_run(config, state, run.ds, run.run_dir, stop, run.source))
        progress.stopped = stop.signal_name
    plot = runlog.plot_curves(run.run_dir) if run.lead else None
    result.update(
        epochs=progress.step // run.per_epoch,
        steps=progress.step,
        seconds=round(time.perf_counter() - started, 2),
        skipped_updates=int(jax.device_get(state.skipped)),
        skipped_images=run.ds.skipped,
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
        if jax.process_count() > 1:
            stop.agree(sharding.preempted)
        tested = [r for r in runlog.read_metrics(run.run_dir) if "test_accuracy" in r]
        progress = Progress(step, {"test_accuracy": tested[-1]["test_accuracy"] if tested else None})
        progress.stopped = stop.signal_name
        try:
            for epoch in range(step // run.per_epoch, config.stop_after_epoch or config.epochs):
                if progress.stopped:
                    break
                state = train_epoch(run, state, epoch, progress, stop)
        except jax.errors.JaxRuntimeError as e:
            if jax.process_count() == 1:
                raise
            raise ProcessLostError(
                f"a collective with the other processes failed at step {progress.step}: one of them died or "
                f"lost its connection ({str(e).splitlines()[0]}); resume the run from its last checkpoint"
            ) from e
        finally:
            run.checkpoints.close()
        return finish(run, state, progress, started)
