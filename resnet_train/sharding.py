"""Data parallelism with jax.sharding: a 1-d mesh named 'data', batches split, the state replicated.

Under jit, a mean over a batch sharded this way is a mean over the global batch, so BatchNorm
statistics are those of the whole batch, as with one device.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .config import TrainConfig

DATA_AXIS = "data"


def initialize(config: TrainConfig) -> None:
    """Join the multi-host job when config.distributed asks (jax.distributed.initialize).

    A process that stops sending heartbeats for config.heartbeat_timeout seconds (it died, or its
    host did) makes the coordination service end every other process with a message saying so,
    instead of leaving them waiting in a collective. The service also carries SIGTERM as a
    preemption notice to all processes (see preempted()).
    """
    if not config.distributed:
        return
    # Collectives between processes on CPUs go through gloo (TCP); GPUs use NCCL whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address or None,
        num_processes=config.num_processes or None,
        process_id=None if config.process_id < 0 else config.process_id,
        heartbeat_timeout_seconds=config.heartbeat_timeout,
    )


def preempted(step: int) -> bool:
    """In a multi-process run, whether every process has reached the step at which to save and stop
    because one of them got SIGTERM (JAX's preemption sync point: all processes agree on the step).

    Every process must call this at every step, from the same first step on.
    """
    return jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step)


def data_mesh(devices: list[Any] | None = None) -> Mesh:
    """A mesh over every visible device (all hosts) with the single axis 'data'."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data'."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch(global_batch: int, mesh: Mesh) -> None:
    """Raise ValueError unless the global batch splits evenly over devices and processes."""
    n, p = mesh.devices.size, jax.process_count()
    if global_batch % n or global_batch % p:
        raise ValueError(f"batch size {global_batch} must be a multiple of the {n} devices ({p} processes)")


def local_slice(global_batch: int) -> slice:
    """This process's rows of a global batch (every process holds the same host data)."""
    per = global_batch // jax.process_count()
    start = jax.process_index() * per
    return slice(start, start + per)


def put_batch(mesh: Mesh, *arrays_global: np.ndarray) -> tuple[jax.Array, ...]:
    """Global host batches -> global jax arrays sharded over 'data' (each process sends its rows)."""
    return put_local(mesh, *(a[local_slice(len(a))] for a in arrays_global))


def put_local(mesh: Mesh, *arrays_local: np.ndarray) -> tuple[jax.Array, ...]:
    """This process's rows of global batches (every process holds as many) -> global jax arrays over 'data'."""
    sharding = batch_sharding(mesh)
    out = []
    for a in arrays_local:
        shape = (len(a) * jax.process_count(), *a.shape[1:])
        out.append(jax.make_array_from_process_local_data(sharding, a, shape))
    return tuple(out)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf of tree on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))
