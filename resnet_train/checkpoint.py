"""Train-state checkpoints through orbax: atomic saves, the latest N and the best one kept."""

from __future__ import annotations

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

    def save(self, state: TrainState, metrics: dict[str, float] | None = None) -> Path:
        """Save state at its step (once per step) with optional metrics for the best-of ranking."""
        step = int(jax.device_get(state.step))
        if step not in self.manager.all_steps():
            tree = {name: getattr(state, name) for name in SAVED_FIELDS}
            self.manager.save(step, args=ocp.args.StandardSave(tree), metrics=metrics)
        return self.path(step)

    def restore(self, like: TrainState, step: int | None = None) -> TrainState:
        """The saved state at step (default: latest), placed with the shardings of `like`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to resume from")
        target = {name: getattr(like, name) for name in SAVED_FIELDS}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        tree = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        return like.replace(**tree)

    def wait(self) -> None:
        """Block until background saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def load_variables(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The params and batch_stats of one saved step folder, as plain host arrays (for inspection)."""
    tree = ocp.StandardCheckpointer().restore(Path(checkpoint_dir).absolute() / "default")
    return {"params": tree["params"], "batch_stats": tree["batch_stats"]}
