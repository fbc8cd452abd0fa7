"""A multi-process run ends in bounded time with status 1, a sentence and the JSON line when its processes
never all start, and when one of them dies (before or during training, the coordinator included): never a
silent wait, never JAX's C++ abort (status -6 with a stack trace)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resnet_train import sharding

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--image-size", "8", "--batch-size", "8", "--epochs", "40", "--no-progress", "--train-limit", "64"]
FLAGS += ["--test-fraction", "0.05"]
LIMIT_S = 5  # --start-timeout and --heartbeat-timeout of these runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp: Path, port: int, process: int, *flags: str) -> tuple[subprocess.Popen, Path, Path]:
    out, err = tmp / f"{process}.out", tmp / f"{process}.err"
    dist = ["--distributed", "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2"]
    command = [sys.executable, "-m", "resnet_train.main", *dist, "--process-id", str(process), *FLAGS, *flags]
    env = {
        **os.environ,
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=1",
        "JAX_PLATFORMS": "cpu",
    }
    with out.open("w") as o, err.open("w") as e:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=o, stderr=e), out, err


def _ended(started: tuple[subprocess.Popen, Path, Path], timeout: float) -> tuple[int, dict, str]:
    """(exit status, the JSON line, stderr) of a process that must end within timeout seconds."""
    proc, out, err = started
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running after {timeout} s: {err.read_text()[-2000:]}") from None
    lines = out.read_text().splitlines()
    assert len(lines) == 1, (proc.returncode, out.read_text(), err.read_text()[-3000:])
    return proc.returncode, json.loads(lines[0]), err.read_text()


def _wait_for(path: Path, text: str, procs: list, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        assert all(p.poll() is None for p, _, _ in procs), [e.read_text()[-2000:] for _, _, e in procs]
        assert time.monotonic() < deadline, f"{text!r} never came"
        time.sleep(0.1)


def _assert_lost(code: int, result: dict, err: str, *words: str) -> None:
    assert code == 1, (code, err[-3000:])
    assert "stack trace" not in err and "Terminating process" not in err, err[-3000:]
    assert result["test_accuracy"] is None and all(w in result["error"] for w in words), result
    assert f"resnet-train: error: {result['error']}" in err


@pytest.mark.slow
def test_lone_processes_say_what_they_wait_for_and_give_up_after_the_start_timeout(tmp_path):
    # Process 0 (which runs the coordination service) and process 1, each the only one of its run.
    lone = [
        _start(tmp_path, _free_port(), i, "--start-timeout", str(LIMIT_S), "--run-dir", str(tmp_path / "r"))
        for i in (0, 1)
    ]
    for started in lone:
        _wait_for(started[2], "waiting up to 5 s (--start-timeout) for 2 processes at 127.0.0.1:", lone)
        waiting = time.monotonic()
        code, result, err = _ended(started, timeout=LIMIT_S + 60)
        assert time.monotonic() - waiting < LIMIT_S + 20
        _assert_lost(code, result, err, "not all 2 processes joined at 127.0.0.1:", "--start-timeout")


def _kill_one_after_both_joined(tmp_path, victim: int) -> tuple[float, int, dict, str]:
    """A run's two processes; process ``victim`` killed once both have joined: (seconds from the kill until the
    other ended, its exit code, its JSON line, its stderr)."""
    port = _free_port()
    flags = ["--heartbeat-timeout", str(LIMIT_S), "--run-dir", str(tmp_path / "r")]
    procs = [_start(tmp_path, port, i, *flags) for i in (0, 1)]
    _wait_for(procs[1][2], "process 1 of 2 joined", procs)
    killed = time.monotonic()
    procs[victim][0].kill()
    procs[victim][0].wait()
    code, result, err = _ended(procs[1 - victim], timeout=LIMIT_S + 60)
    return time.monotonic() - killed, code, result, err


@pytest.mark.slow
def test_a_process_that_dies_before_training_ends_the_other_within_the_heartbeat_timeout(tmp_path):
    waited, code, result, err = _kill_one_after_both_joined(tmp_path, victim=1)
    assert waited < LIMIT_S + 10
    _assert_lost(code, result, err, "process 1 sent no heartbeat for 5 s (--heartbeat-timeout)", "resume the run")


@pytest.mark.slow
def test_the_coordinator_dying_ends_the_other_at_once_with_status_1(tmp_path):
    # Process 0 runs JAX's coordination service: its death is what JAX's client would answer with an abort.
    waited, code, result, err = _kill_one_after_both_joined(tmp_path, victim=0)
    assert waited < LIMIT_S
    _assert_lost(code, result, err, "died", "resume the run")  # the relay or a failed collective says so first


class _Store:
    """A coordination service's key-value store in which process 1 beats a few times, then goes silent."""

    def __init__(self, beats: int) -> None:
        self.values: dict[str, str] = {}
        self.beats = beats

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        self.values[key] = value
        if self.beats > 0:
            self.beats -= 1
            self.values[sharding.BEAT_KEY.format(1)] = str(self.beats)

    def key_value_try_get(self, key: str) -> str:
        return self.values.get(key, "")


def test_the_heartbeat_watch_ends_the_process_when_another_goes_silent(monkeypatch):
    import threading

    said: list[str] = []

    def lost(message: str):
        said.append(message)
        raise SystemExit(1)

    monkeypatch.setattr(sharding, "process_lost", lost)
    monkeypatch.setattr(sharding, "BEAT_EVERY_S", 0.01)
    started = time.monotonic()
    with pytest.raises(SystemExit):
        sharding._watch_heartbeats(_Store(beats=20), 0, 2, 0.5, threading.Event())
    assert said == [
        "process 1 sent no heartbeat for 0.5 s (--heartbeat-timeout): it died or lost its connection; "
        "resume the run from its last checkpoint"
    ]
    assert 0.5 <= time.monotonic() - started < 5
    finished = _Store(beats=0)
    finished.values[sharding.BEAT_KEY.format(1)] = sharding.DONE  # finished, not dead: no alarm
    done = threading.Event()
    watch = threading.Thread(target=sharding._watch_heartbeats, args=(finished, 0, 2, 0.05, done))
    watch.start()
    time.sleep(0.3)
    done.set()
    watch.join(timeout=5)
    assert said == [said[0]] and finished.values[sharding.BEAT_KEY.format(0)] == sharding.DONE
