"""Train-state checkpoints through orbax: atomic saves, the latest N and the best one kept."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from .steps import TrainState

# The metric that ranks checkpoints for "best"; higher is better.
BEST_METRIC = "test_accuracy"
# TrainState fields that are arrays (the rest are functions and constants rebuilt from the config).
SAVED_FIELDS = ("step", "params", "batch_stats", "opt_state", "skipped")
# The train state's folder in a step folder: orbax names a lone item "default"; beside other items
# (a streamed run's data-iterator state) it is "state". orbax tells the two kinds apart by "default".
LONE_ITEM, STATE_ITEM = "default", "state"


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
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(preservation_policy=policy, create=True)
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def path(self, step: int) -> Path:
        """The folder of one saved step."""
        return self.directory / str(step)

    def save(
        self, state: TrainState, metrics: dict[str, float] | None = None, items: Mapping[str, Any] | None = None
    ) -> Path:
        """Save state at its step (once per step) with optional metrics for the best-of ranking, and
        other items beside it (name -> orbax save args, e.g. the data iterator's grain.checkpoint.CheckpointSave)."""
        step = int(jax.device_get(state.step))
        if step not in self.manager.all_steps():
            tree = ocp.args.StandardSave({name: getattr(state, name) for name in SAVED_FIELDS})
            args = ocp.args.Composite(**{STATE_ITEM: tree}, **items) if items else tree
            self.manager.save(step, args=args, metrics=metrics)
        return self.path(step)

    def restore(self, like: TrainState, step: int | None = None, items: Mapping[str, Any] | None = None) -> TrainState:
        """The saved state at step (default: latest), placed with the shardings of `like`; the other
        items are restored through their restore args (name -> e.g. grain.checkpoint.CheckpointRestore)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to resume from")
        target = {name: getattr(like, name) for name in SAVED_FIELDS}
        tree = ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, target))
        if not items:
            return like.replace(**self.manager.restore(step, args=tree))
        missing = [name for name in (STATE_ITEM, *items) if not (self.path(step) / name).is_dir()]
        if missing:
            raise ValueError(
                f"{self.path(step)}: no {', '.join(missing)} saved there; this run's data needs them to resume "
                "(a run saved by an older version that held its images in memory cannot continue as a stream)"
            )
        args = ocp.args.Composite(**{STATE_ITEM: tree}, **items)
        return like.replace(**self.manager.restore(step, args=args)[STATE_ITEM])

    def wait(self) -> None:
        """Block until background saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def load_variables(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The params and batch_stats of one saved step folder, for inspection: on this process's first device,
    however many devices and processes saved it."""
    folder = Path(checkpoint_dir).absolute()
    item = folder / STATE_ITEM if (folder / STATE_ITEM).is_dir() else folder / LONE_ITEM
    checkpointer = ocp.StandardCheckpointer()
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    saved = checkpointer.metadata(item).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), saved)
    tree = checkpointer.restore(item, target)
    return {"params": tree["params"], "batch_stats": tree["batch_stats"]}
