"""Train-state checkpoints through orbax: atomic saves, the latest N and the best one kept, each verifiable.

Each step's orbax metadata records a sha256 of the saved arrays (``custom_metadata``); a restore
recomputes it, so a flipped bit is refused instead of resuming from different weights. A streamed
run saves its data iterators' positions as a second item beside the train state.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
import threading
import time
import traceback
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.futures import future as orbax_futures
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from parity.conversion.atomic import arrays_digest

from .api import TrainStateLike

log = logging.getLogger(__name__)
ABSL_LOGGER = logging.getLogger("absl")  # orbax logs through absl

S = TypeVar("S", bound=TrainStateLike)  # a train state of either API

# The metric that ranks checkpoints for "best"; higher is better.
BEST_METRIC = "test_accuracy"
# TrainStateLike fields that are arrays (the rest are functions and constants rebuilt from the config).
SAVED_FIELDS = ("step", "params", "batch_stats", "opt_state", "skipped")
# The key of the arrays' sha256 in each step's orbax custom metadata.
DIGEST_KEY = "sha256"
# Where a checkpoint that fails to restore is moved, beside the checkpoints folder (kept, never deleted).
DAMAGED_SUFFIX = "-damaged"


class DamagedCheckpointError(ValueError):
    """A train-state checkpoint is damaged (its arrays differ from their digest) or none of a run's restores;
    the message names the folder."""


class IncompatibleCheckpointError(ValueError):
    """A checkpoint this run cannot continue from whole (not damaged: saved without what this run needs)."""


class CheckpointSaveError(OSError):
    """orbax could not write a checkpoint (a full disk, a read-only folder, ...); the message names the step."""


def state_digest(tree: Any) -> str:
    """sha256 over every array of a train-state tree, named by its path (replicated: one local copy each).

    Names are plain keys and indices joined by '/', so a tree restored without its target (optax
    states as dicts) names its arrays as the saved one did. The digest is ``arrays_digest``'s, the
    format of the weight files' ``tensors_digest``.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    names = [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in leaves]
    local = [x.addressable_data(0) if isinstance(x, jax.Array) else x for _, x in leaves]
    host = [np.asarray(x) for x in jax.device_get(local)]
    return arrays_digest(dict(zip(names, host, strict=True)))


def _loop_closed(exc: BaseException | None, tb: types.TracebackType | None) -> bool:
    """Whether an exception is asyncio's "Event loop is closed", raised in asyncio itself (called from C)."""
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
        return False
    return all(f"{os.sep}asyncio{os.sep}" in frame.filename for frame in traceback.extract_tb(tb))


def _quiet_late_orbax_callbacks() -> None:
    """Silence, for this process, one harmless report of a failed orbax save or restore.

    TensorStore reads and writes still in flight when orbax gave up (a corrupt array, a full disk)
    each report "Event loop is closed" when they end, one traceback per array: a read through
    sys.unraisablehook, a write's callback through sys.excepthook. Every other report passes through.
    """
    previous, previous_except = sys.unraisablehook, sys.excepthook
    if getattr(previous, "quiet_late_orbax_callbacks", False):
        return

    def hook(unraisable: Any) -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    def except_hook(kind: type[BaseException], value: BaseException, tb: types.TracebackType | None) -> None:
        if not _loop_closed(value, tb):
            previous_except(kind, value, tb)

    hook.quiet_late_orbax_callbacks = True  # type: ignore[attr-defined]
    sys.unraisablehook, sys.excepthook = hook, except_hook
    # The same reads can instead end as futures whose error nobody retrieves; asyncio logs each one.
    logging.getLogger("asyncio").addFilter(_LateReadFilter())


class _FailedSaveFilter(logging.Filter):
    """Drops orbax's tracebacks of a failed background save: wait() raises CheckpointSaveError with its reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and f"{os.sep}orbax{os.sep}checkpoint{os.sep}" in record.pathname)


class _LateReadFilter(logging.Filter):
    """Drops asyncio's report of an orbax read (a future or a task) whose error a failed restore no longer
    retrieves; the restore has said why it failed. Such reports come when the read is garbage-collected,
    which can be during a later run in the same process."""

    UNRETRIEVED = ("Future exception was never retrieved", "Task exception was never retrieved")

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.UNRETRIEVED):
            return True
        tb = record.exc_info[2] if record.exc_info else None
        return tb is not None and not any("orbax" in frame.filename for frame in traceback.extract_tb(tb))


def _verified(path: Path, tree: Any) -> Any:
    """tree, once its arrays match the sha256 recorded when the step folder `path` was saved (none: a notice)."""
    recorded = (ocp.metadata.get_step_metadata(path).custom_metadata or {}).get(DIGEST_KEY)
    if recorded is None:
        log.warning("%s: no digest recorded (saved without one): it cannot be verified", path)
    elif state_digest(tree) != recorded:
        raise DamagedCheckpointError(f"{path}: corrupted: the arrays differ from the sha256 recorded at save time")
    return tree


# The train state's folder in a step folder: orbax names a lone item "default"; beside other items
# (a streamed run's data-iterator state) it is "state". orbax tells the two kinds apart by "default".
LONE_ITEM, STATE_ITEM = "default", "state"
# Where TensorStore's errors start a JSON dump of the storage specification (hundreds of characters).
TENSORSTORE_SPEC = " [tensorstore_spec"
# How long a failed save's woken orbax threads get to end (each fails at its first write).
ABANDON_SECONDS = 30


# How orbax says that a restore target and the saved tree differ: a diff after the first line, or one path.
ORBAX_TREE_MISMATCH = "tree structures do not match:"
ORBAX_PATH_MISSING = re.compile(r"Target path \(([^)]*)\) not found in metadata_tree")
NAMES_SHOWN = 5


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
    return ", ".join(names[:NAMES_SHOWN]) + more


def _tree_differences(message: str) -> str | None:
    """What orbax's structure-mismatch error says, in one clause (None: the error is another)."""
    saved_only: list[str] = []
    model_only: list[str] = []
    if ORBAX_TREE_MISMATCH in message:
        lines = message.splitlines()
        for key, source, target in zip(lines, lines[1:], lines[2:], strict=False):
            if key.endswith(":") and not key.startswith(" ") and "Source: MISSING" in source:
                saved_only.append(key[:-1])
            elif key.endswith(":") and not key.startswith(" ") and "Target: MISSING" in target:
                model_only.append(key[:-1])
    elif missing := ORBAX_PATH_MISSING.search(message):
        model_only.append(".".join(part.strip(" '\"") for part in missing.group(1).split(",") if part.strip()))
    else:
        return None
    parts = [f"saved but not in the model: {_listed(saved_only)}"] if saved_only else []
    parts += [f"in the model but not saved: {_listed(model_only)}"] if model_only else []
    return "; ".join(parts) or "their trees differ"


def _reason(e: BaseException) -> str:
    """A restore error in one line: its first line, without the storage specification TensorStore appends."""
    first = (str(e).strip() or type(e).__name__).splitlines()[0]
    return first.split(TENSORSTORE_SPEC, 1)[0].rstrip()


class Checkpoints:
    """A folder of train-state checkpoints, one sub-folder per step, written by orbax atomically."""

    def __init__(self, directory: str | Path, keep: int) -> None:
        self.directory = Path(directory).absolute()
        policy = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep),
                policies.BestN(
                    get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        )
        if not any(isinstance(f, _FailedSaveFilter) for f in ABSL_LOGGER.filters):
            ABSL_LOGGER.addFilter(_FailedSaveFilter())
        _quiet_late_orbax_callbacks()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(preservation_policy=policy, create=True)
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def path(self, step: int) -> Path:
        """The folder of one saved step."""
        return self.directory / str(step)

    def save(
        self, state: TrainStateLike, metrics: dict[str, float] | None = None, items: Mapping[str, Any] | None = None
    ) -> Path:
        """Save state at its step (once per step) with optional metrics for the best-of ranking, and
        other items beside it (name -> orbax save args, e.g. the data iterator's grain.checkpoint.CheckpointSave)."""
        step = int(jax.device_get(state.step))
        if step not in self.manager.all_steps():
            tree = {name: getattr(state, name) for name in SAVED_FIELDS}
            saved = ocp.args.StandardSave(tree)
            try:
                self.manager.save(
                    step,
                    args=ocp.args.Composite(**{STATE_ITEM: saved}, **items) if items else saved,
                    metrics=metrics,
                    custom_metadata={DIGEST_KEY: state_digest(tree)},
                )
            except Exception as e:
                raise CheckpointSaveError(f"{self.path(step)}: cannot save the checkpoint: {e}") from e
        return self.path(step)

    def restore(self, like: S, step: int | None = None, items: Mapping[str, Any] | None = None) -> S:
        """The saved state at step (default: latest), placed with the shardings of `like`, its digest checked;
        the other items are restored through their restore args (name -> e.g. grain.checkpoint.CheckpointRestore)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to resume from")
        target = {name: getattr(like, name) for name in SAVED_FIELDS}
        tree = ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, target))
        if items:
            missing = [name for name in (STATE_ITEM, *items) if not (self.path(step) / name).is_dir()]
            if missing:
                raise IncompatibleCheckpointError(
                    f"{self.path(step)}: no {', '.join(missing)} saved there; this run's data needs them to resume "
                    "(a run that held its images in memory cannot continue as a stream)"
                )
        try:
            if items:
                restored = self.manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: tree}, **items))
                restored = restored[STATE_ITEM]
            else:
                restored = self.manager.restore(step, args=tree)
        except ValueError as e:
            differences = _tree_differences(str(e))
            if differences is None:
                raise
            raise IncompatibleCheckpointError(
                f"{self.path(step)}: the saved arrays are not those of the model these settings describe "
                f"({differences}); resume with the settings the run was saved with (its config.json)"
            ) from None
        return like.replace(**_verified(self.path(step), restored))

    def restore_latest_good(self, like: S, items: Mapping[str, Any] | None = None) -> S | None:
        """The newest checkpoint that restores intact; None when there is no checkpoint at all.

        A newer one that fails while an older one restores is damaged: one warning names it and it
        is moved to ``<checkpoints>-damaged/`` (kept, and its step can be saved again). When none
        restores (a damaged disk, or checkpoints of another program version) nothing is moved and
        DamagedCheckpointError gives the newest one's reason.
        """
        failed: list[tuple[int, str]] = []
        _quiet_late_orbax_callbacks()
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state = self.restore(like, step, items)
            except IncompatibleCheckpointError:
                raise
            except Exception as e:  # orbax and tensorstore raise many kinds; the first line says which
                reason = _reason(e)
                log.warning("%s cannot be restored (%s); trying the one before", self.path(step), reason)
                failed.append((step, reason))
                continue
            if failed:
                self._move_aside([s for s, _ in failed])
            return state
        if failed:
            step, reason = failed[0]
            raise DamagedCheckpointError(
                f"{self.path(step)}: no checkpoint of this run can be restored; the newest: {reason}"
            )
        return None

    def _move_aside(self, steps: list[int]) -> None:
        aside = self.directory.with_name(self.directory.name + DAMAGED_SUFFIX)
        if jax.process_index() == 0:
            aside.mkdir(exist_ok=True)
            for step in steps:
                target = aside / f"{step}.{time.time_ns()}"
                self.path(step).rename(target)
                log.warning("moved the damaged checkpoint of step %d to %s", step, target)
        self.manager.reload()

    def wait(self) -> None:
        """Block until background saves are on disk."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise CheckpointSaveError(f"{self.directory}: cannot finish saving a checkpoint: {e}") from e

    def close(self) -> None:
        """Wait for background saves, then close the manager. After a failed save (CheckpointSaveError) no
        orbax thread is left waiting: the interpreter joins such threads at exit, for minutes."""
        try:
            self.wait()
        except CheckpointSaveError:
            _abandon_waiting_commits()
            raise
        self.manager.close()


def _abandon_waiting_commits() -> None:
    """Cancel orbax's background commit threads and wake those waiting for a signal that a failed step will
    never send (e.g. that its folder was created): a cancelled thread ends without running its commit, whose
    coroutines are closed unstarted (else each warns "never awaited" when collected)."""
    waiting = [t for t in threading.enumerate() if isinstance(t, orbax_futures._SignalingThread)]
    for thread in waiting:
        thread.cancel()
        orbax_futures.set_signals(thread._receive_signals, operation_id=thread._operation_id)
    for thread in waiting:
        threading.Thread.join(thread, timeout=ABANDON_SECONDS)
        _close_unstarted(thread._target, set())


def _close_unstarted(obj: Any, seen: set[int]) -> None:
    """Close the coroutines that a function's closure, a coroutine's arguments or a sequence hold, unstarted."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if inspect.iscoroutine(obj):
        if inspect.getcoroutinestate(obj) == inspect.CORO_CREATED and obj.cr_frame is not None:
            for value in obj.cr_frame.f_locals.values():  # its arguments, unawaited too
                _close_unstarted(value, seen)
            obj.close()
    elif inspect.isfunction(obj):
        for cell in obj.__closure__ or ():
            _close_unstarted(cell.cell_contents, seen)
    elif isinstance(obj, list | tuple):
        for value in obj:
            _close_unstarted(value, seen)


def load_variables(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The params and batch_stats of one saved step folder, for inspection: verified, on this process's first
    device, however many devices and processes saved it."""
    folder = Path(checkpoint_dir).absolute()
    item = folder / STATE_ITEM if (folder / STATE_ITEM).is_dir() else folder / LONE_ITEM
    checkpointer = ocp.StandardCheckpointer()
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    saved = checkpointer.metadata(item).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), saved)
    tree = _verified(folder, checkpointer.restore(item, target))
    return {"params": tree["params"], "batch_stats": tree["batch_stats"]}
