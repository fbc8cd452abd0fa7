"""A run directory's record: metrics as JSON lines, the config, a PNG plot of the curves, and its lock;
log lines that name their process."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from parity.conversion.atomic import atomic_write

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
PLOT_FILE = "curves.png"
LOCK_FILE = "lock"  # flock'ed by the run using the folder; holds its process id

log = logging.getLogger(__name__)


class RunDirBusyError(ValueError):
    """Another process holds the run directory's lock."""


def _open_lock(path: Path) -> int:
    """A descriptor of the lock file, created if missing; never through a symlink, never of another kind of file."""
    not_regular = ValueError(f"{path} is not a regular file (a symlink?); remove it or choose another --run-dir")
    try:
        # O_NONBLOCK: opening a fifo would wait for a writer.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR):  # a symlink; a folder
            raise not_regular from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise not_regular
    return fd


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive flock on run_dir/lock while inside; the kernel drops it when the process ends, however.

    A second run in the same folder fails at once with RunDirBusyError naming the holder's process id. A lock
    that is not a regular file (a symlink, whose target the process id would overwrite; a folder, a fifo) is
    refused with a ValueError.
    """
    fd = _open_lock(run_dir / LOCK_FILE)
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


def _read(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The JSON lines of a metrics file, and whether its last line was torn (text after the last newline, or a
    last line that is not JSON): a crash in the middle of its write can leave one. Any other line that is not
    a JSON object is a ValueError naming the file and the line."""
    if not path.exists():
        return [], False
    *lines, tail = path.read_bytes().decode(errors="replace").split("\n")
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    records: list[dict[str, Any]] = []
    for number, line in numbered:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == numbered[-1][0] and not tail.strip():
                return records, True
            raise ValueError(f"{path}, line {number}: not JSON ({e.msg}); each line holds one metrics record") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: a JSON {type(record).__name__}, not a metrics record (an object)")
        records.append(record)
    return records, bool(tail.strip())


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every metrics line written so far (earlier invocations of a resumed run included), a torn last
    line left out."""
    return _read(run_dir / METRICS_FILE)[0]


def keep_metrics_until(run_dir: Path, step: int) -> None:
    """Drop metrics lines of steps after `step` (written before a crash, past the checkpoint resumed from)
    and a torn last line, so that appended lines follow whole ones."""
    path = run_dir / METRICS_FILE
    records, torn = _read(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if torn:
        log.warning("%s: dropped a torn last line (the run stopped while writing it)", path)
    if len(kept) < len(records):
        log.warning("%s: dropped %d lines past step %d", path, len(records) - len(kept), step)
    if torn or len(kept) < len(records):
        write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one JSON line, written whole by one write call and fsynced: a crash can leave only a
    torn last line, which reading leaves out."""
    path = run_dir / METRICS_FILE
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            written = os.write(fd, line)
            if written != len(line):  # only a full disk cuts a regular file's write short
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e


def check_class_names(saved_run: dict[str, Any], class_names: Sequence[str]) -> None:
    """Refuse to resume a run (its config.json, read) whose data now has other classes: its labels would
    mean other things."""
    saved = saved_run.get("class_names")
    if saved is not None and saved != list(class_names):
        changed = ", ".join(sorted(set(saved) ^ set(class_names))[:5]) or "the same names, in another order"
        raise ValueError(
            f"--resume: the data's classes are not the run's ({len(saved)} then, {len(class_names)} now; "
            f"added or removed: {changed}), so its labels would mean other things"
        )


def name_process(index: int, count: int) -> None:
    """In a multi-process run, start every log line with the process that wrote it."""
    if count > 1:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(f"[process {index}/{count}] %(message)s"))


def plot_curves(run_dir: Path) -> Path | None:
    """Loss and accuracy against epochs as a PNG: training every --log-every steps (per epoch when
    there are no step records), the test split per epoch; None when there is nothing to plot."""
    records = read_metrics(run_dir)
    epochs = [r for r in records if "epoch" in r]
    steps = [r for r in records if "epoch_progress" in r]
    if not epochs and not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if steps:
        x = [r["epoch_progress"] for r in steps]
        ax_loss.plot(x, [r["loss"] for r in steps], label="train")
        ax_acc.plot(x, [r["accuracy"] for r in steps], label="train")
    else:
        x = [r["epoch"] for r in epochs]
        ax_loss.plot(x, [r["train_loss"] for r in epochs], marker="o", label="train")
        ax_acc.plot(x, [r["train_accuracy"] for r in epochs], marker="o", label="train")
    x = [r["epoch"] for r in epochs]
    ax_loss.plot(x, [r["test_loss"] for r in epochs], marker="o", label="test")
    ax_acc.plot(x, [r["test_accuracy"] for r in epochs], marker="o", label="test")
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
