"""A run directory's record: metrics as JSON lines, the config, a PNG plot of the curves, and its lock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from parity.files import atomic_write

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
PLOT_FILE = "curves.png"
LOCK_FILE = "lock"  # flock'ed by the run using the folder; holds its process id

log = logging.getLogger(__name__)


class RunDirBusyError(ValueError):
    """Another process holds the run directory's lock."""


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive flock on run_dir/lock while inside; the kernel drops it when the process ends, however.

    A second run in the same folder fails at once with RunDirBusyError naming the holder's process id.
    """
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirBusyError(
                f"{run_dir} is in use by another run (process {holder}); wait for it to end or choose another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write data to path all at once (temporary file beside it, then a rename)."""
    atomic_write(path, lambda f: f.write(data))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every metrics line written so far (earlier invocations of a resumed run included)."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def keep_metrics_until(run_dir: Path, step: int) -> None:
    """Drop metrics lines of steps after `step` (written before a crash, past the checkpoint resumed from)."""
    records = read_metrics(run_dir)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) < len(records):
        log.warning("%s: dropped %d lines past step %d", run_dir / METRICS_FILE, len(records) - len(kept), step)
        write_atomic(run_dir / METRICS_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (the file is rewritten under a temporary name and renamed)."""
    path = run_dir / METRICS_FILE
    old = path.read_bytes() if path.exists() else b""
    write_atomic(path, old + (json.dumps(record, sort_keys=True) + "\n").encode())


def plot_curves(run_dir: Path) -> Path | None:
    """loss and accuracy per epoch (train and test) as a PNG; None when there is nothing to plot."""
    records = [r for r in read_metrics(run_dir) if "epoch" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "test"):
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in records], marker="o", label=split)
        ax_acc.plot(epochs, [r[f"{split}_accuracy"] for r in records], marker="o", label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = run_dir / PLOT_FILE
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path
