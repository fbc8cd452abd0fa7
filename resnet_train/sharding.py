"""Data parallelism with jax.sharding: a 1-d mesh named 'data', batches split, the state replicated.

Under jit, a mean over a batch sharded this way is a mean over the global batch, so BatchNorm
statistics are those of the whole batch, as with one device.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import jax
import numpy as np
from jax._src import distributed as jax_distributed  # private: jax.distributed exposes no key-value client
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .config import TrainConfig

DATA_AXIS = "data"
log = logging.getLogger(__name__)


# How much longer than our own limits JAX's coordination service waits before it aborts the process
# itself (a C++ abort: no sentence, no JSON line), so that ours always end the process first.
SERVICE_SLACK_S = 30
BEAT_KEY = "resnet_train/heartbeat/{}"
BEAT_EVERY_S = 1.0
DONE = "done"  # a process's last heartbeat: it finished, it did not die
ANSWER_TIMEOUT_S = 5.0  # how long a live coordinator may take to answer a new connection
_ending = threading.Lock()


def _say(message: str) -> None:
    """A lost process's sentence on stderr (the caller exits)."""
    print(f"resnet-train: error: {message}", file=sys.stderr, flush=True)


_lost_handlers: list[Callable[[str], object]] = [_say]


@contextlib.contextmanager
def on_process_lost(say: Callable[[str], object]) -> Iterator[None]:
    """While inside, ``say(sentence)`` is what a lost process does before it exits with status 1
    (``resnet-train`` prints the sentence and its JSON line)."""
    _lost_handlers.append(say)
    try:
        yield
    finally:
        _lost_handlers.remove(say)


def process_lost(message: str) -> NoReturn:
    """End this process of a multi-process run with status 1, after the handler has said why.

    The process ends at once (os._exit): JAX's exit-time shutdown would wait in a barrier for the lost
    process and then abort. The first caller ends the process; a second (another thread) waits for it.
    """
    with _ending:
        _lost_handlers[-1](message)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # the status of a failed run
    raise AssertionError("unreachable")  # pragma: no cover


def _watch_heartbeats(client: Any, me: int, count: int, timeout: float, done: threading.Event) -> None:
    """Every second, publish this process's heartbeat and check the others': a process silent for
    ``timeout`` seconds, or a coordinator that no longer answers, ends this one (process_lost)."""
    beat, last = 0, dict[int, tuple[str, float]]()
    peers = [p for p in range(count) if p != me]
    started = time.monotonic()
    while True:
        beat += 1
        finished = done.is_set()
        try:
            client.key_value_set(BEAT_KEY.format(me), DONE if finished else str(beat), allow_overwrite=True)
            seen = {p: _try_get(client, BEAT_KEY.format(p)) for p in peers}
        except jax.errors.JaxRuntimeError as e:
            process_lost(
                f"the coordinator (process 0) stopped answering: it died or lost its connection "
                f"({str(e).splitlines()[0]}); resume the run from its last checkpoint"
            )
        if finished:
            return
        now = time.monotonic()
        for p, value in seen.items():
            if p not in last or last[p][0] != value:
                last[p] = (value, now)
        for p in peers:
            if seen[p] != DONE and now - last.get(p, ("", started))[1] > timeout:
                process_lost(
                    f"process {p} sent no heartbeat for {timeout:g} s (--heartbeat-timeout): it died or lost its "
                    "connection; resume the run from its last checkpoint"
                )
        time.sleep(BEAT_EVERY_S)


class _CoordinatorRelay:
    """A local TCP relay between this process's JAX client and the coordination service (process 0).

    When process 0 dies, JAX's client sees its connection close and aborts the process within a second
    (a C++ abort: no sentence, no JSON line), and no option of this jaxlib turns that off. Through the
    relay, the closed connection reaches this process first: while it runs (joined, not finished), a
    coordinator that closed the connection and does not answer a new one is dead, and this process ends with
    process_lost before JAX's client learns of it. A connection closed by a coordinator that still
    answers is passed on, and JAX reconnects.
    """

    def __init__(self, coordinator: str, running: threading.Event) -> None:
        host, port = coordinator.rsplit(":", 1)
        self._coordinator = (host.strip("[]"), int(port))
        self._running = running
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, name="coordinator-relay", daemon=True).start()

    def _accept(self) -> None:
        while True:
            client = self._server.accept()[0]
            try:
                service = socket.create_connection(self._coordinator)
            except OSError:  # not up yet: JAX's client retries, as it would without the relay
                client.close()
                continue
            for args in ((service, client, True), (client, service, False)):
                threading.Thread(target=self._pass, args=args, name="coordinator-relay", daemon=True).start()

    def _pass(self, source: socket.socket, target: socket.socket, from_coordinator: bool) -> None:
        """Copy bytes one way until the source closes; only the coordinator's side closing closes both."""
        while True:
            try:
                data = source.recv(1 << 16)
                if data:
                    target.sendall(data)
                    continue
            except OSError:
                pass
            break
        if not from_coordinator:  # JAX's client closed (or the coordinator went, which its side handles)
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)
            return
        if self._running.is_set() and not self._coordinator_answers():
            process_lost(
                "the coordinator (process 0) died: it closed its connection and does not answer a new one; "
                "resume the run from its last checkpoint"
            )
        for end in (source, target):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def _coordinator_answers(self) -> bool:
        """Whether a new connection to the coordinator gets its first bytes (a gRPC server speaks first: its
        HTTP/2 settings, within milliseconds); a dying process may still complete a connection, never answer."""
        try:
            with socket.create_connection(self._coordinator, timeout=ANSWER_TIMEOUT_S) as probe:
                return bool(probe.recv(1))
        except OSError:
            return False


def _try_get(client: Any, key: str) -> str:
    try:
        return client.key_value_try_get(key)
    except jax.errors.JaxRuntimeError as e:
        if "NOT_FOUND" in str(e):
            return ""
        raise


@contextlib.contextmanager
def initialize(config: TrainConfig) -> Iterator[None]:
    """Join the multi-host job when config.distributed asks (jax.distributed.initialize); while inside,
    a lost process ends this one.

    Every way this can fail ends the process with status 1 and a sentence (process_lost), in bounded
    time: the other processes not all joining within config.start_timeout seconds (said at once: this
    one waits for N processes at ADDRESS), a process that stops sending heartbeats for
    config.heartbeat_timeout seconds (it died, or its host did), a coordinator that stops answering.
    The service also carries SIGTERM as a preemption notice to all processes (see preempted()).
    Leaving marks this process finished, so the others (process 0 still exporting) do not take it for dead.
    """
    if not config.distributed:
        yield
        return
    # Collectives between processes on CPUs go through gloo (TCP); GPUs use NCCL whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or "the detected coordinator"
    count = config.num_processes or "all"
    log.info("waiting up to %d s (--start-timeout) for %s processes at %s", config.start_timeout, count, address)
    timer = threading.Timer(
        config.start_timeout,
        process_lost,
        args=(
            f"not all {count} processes joined at {address} within {config.start_timeout} s (--start-timeout): "
            "start every process with the same --coordinator-address and --num-processes",
        ),
    )
    timer.daemon = True
    timer.start()
    running = threading.Event()  # joined and not finished: a coordinator lost now is a failed run
    coordinator = config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    bind = None
    if coordinator and config.process_id != 0:
        # where process 0, should this be it, runs the service: JAX would derive it from the relay's address
        bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS") or "[::]:" + coordinator.rsplit(":", 1)[1]
        coordinator = _CoordinatorRelay(coordinator, running).address
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            coordinator_bind_address=bind,
            num_processes=config.num_processes or None,
            process_id=None if config.process_id < 0 else config.process_id,
            initialization_timeout=config.start_timeout + SERVICE_SLACK_S,
            heartbeat_timeout_seconds=config.heartbeat_timeout + SERVICE_SLACK_S,
        )
    finally:
        timer.cancel()
    log.info("process %d of %d joined at %s", jax.process_index(), jax.process_count(), address)
    done = threading.Event()
    # jax keeps the client of the coordination service here (orbax reads it the same way).
    client = jax_distributed.global_state.client
    args = (client, jax.process_index(), jax.process_count(), config.heartbeat_timeout, done)
    watcher = threading.Thread(target=_watch_heartbeats, args=args, name="heartbeats", daemon=True)
    watcher.start()
    running.set()
    try:
        yield
        running.clear()  # finished: the coordinator may now go without this run failing
    finally:
        done.set()
        watcher.join()


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
