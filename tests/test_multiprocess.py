"""Two processes on 127.0.0.1 (2 CPU devices each, gloo collectives) train a few steps as one 4-device
process does, write each checkpoint once, both restore it, one exports; a SIGTERM to one stops both at
the same step with one checkpoint; a process that dies ends the other."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from resnet_train.checkpoint import load_variables

REPO = Path(__file__).resolve().parents[1]
# digits at 8x8, batches of 8; the schedule spans 40 epochs, the runs stop far earlier.
FLAGS = ["--image-size", "8", "--batch-size", "8", "--epochs", "40", "--test-fraction", "0.05", "--no-progress"]
# 2 steps per epoch: a few steps.
SHORT = ["--train-limit", "16"]
# The two runs differ only in the order gloo sums across processes, so their parameters differ by float32
# rounding, carried forward by how well the step is conditioned. At 16x16 with BatchNorm's two-pass
# variance: 2e-8 relative after 2 steps (this 2-core CPU). At 8x8 (1x1 feature maps in the last stage,
# flat backgrounds) 3.9e-5, with the fused BatchNorm's one-pass variance 7e-6 at 16x16: the same
# rounding, amplified; docs/multiprocess.md.
EQUAL = ["--image-size", "16", "--no-fused-bn"]  # after FLAGS: the last --image-size counts
# Every test trains this run (its length and the stop differ), so all of them use the programs the first compiled
# (the schedule's length is part of the program: --epochs and --train-limit stay as they are).
RUN = [*EQUAL, *SHORT]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    return {
        **os.environ,
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }


def _launch(tmp: Path, name: str, *flags: str) -> list[tuple[subprocess.Popen, Path, Path]]:
    """Two processes of one distributed run; stdout and stderr go to files named after the run."""
    port = _free_port()
    procs = []
    for i in range(2):
        out, err = tmp / f"{name}.{i}.out", tmp / f"{name}.{i}.err"
        dist = ["--distributed", "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2"]
        command = [sys.executable, "-m", "resnet_train.main", *dist, "--process-id", str(i), *FLAGS, *flags]
        with out.open("w") as o, err.open("w") as e:
            procs.append((subprocess.Popen(command, cwd=REPO, env=_env(2), stdout=o, stderr=e), out, err))
    return procs


def _wait(procs, timeout: float) -> list[tuple[int, dict | None, str, str]]:
    """(exit code, the JSON of stdout's last line, stdout, stderr) of each process."""
    results = []
    for proc, out, err in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p, _, _ in procs:
                p.kill()
            raise
        stdout = out.read_text()
        lines = stdout.strip().splitlines()
        results.append((proc.returncode, json.loads(lines[-1]) if lines else None, stdout, err.read_text()))
    return results


def _wait_for_training(run_dir: Path, procs, timeout: float = 600) -> None:
    """Until process 0 has recorded a training step (both processes are then in the loop)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text().strip()):
        assert all(p.poll() is None for p, _, _ in procs), [e.read_text()[-2000:] for _, _, e in procs]
        assert time.monotonic() < deadline, "no training step recorded"
        time.sleep(0.2)


def _flat(variables: dict) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(variables)])


@pytest.mark.slow
def test_two_processes_train_as_one_restore_and_export_once(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    # The one-process run with 4 devices runs beside the two processes: while they wait on each other it computes.
    command = [sys.executable, "-m", "resnet_train.main", *FLAGS, *RUN, "--run-dir", str(one), "--no-export"]
    out, err = tmp_path / "single.out", tmp_path / "single.err"
    with out.open("w") as o, err.open("w") as e:
        single = subprocess.Popen([*command, "--stop-after-epoch", "1"], cwd=REPO, env=_env(4), stdout=o, stderr=e)
    first = _wait(
        _launch(tmp_path, "first", *RUN, "--run-dir", str(two), "--stop-after-epoch", "1", "--no-export"), 600
    )
    [(code, result, _, single_err)] = _wait([(single, out, err)], 600)
    assert code == 0 and result is not None, single_err[-3000:]
    for code, run, _, err in first:
        assert code == 0 and run is not None and (run["steps"], run["devices"]) == (2, 4), err[-3000:]
    assert first[0][1]["checkpoint"] == first[1][1]["checkpoint"] == str(two / "checkpoints" / "2")
    assert result["devices"] == 4 and result["steps"] == 2
    a, b = _flat(load_variables(first[0][1]["checkpoint"])), _flat(load_variables(result["checkpoint"]))
    assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-6

    resumed = _wait(
        _launch(tmp_path, "resumed", *RUN, "--run-dir", str(two), "--resume", "--stop-after-epoch", "2"), 600
    )
    for code, run, _, err in resumed:
        assert code == 0 and run is not None and run["steps"] == 4, err[-3000:]
        assert "resumed from step 2" in err
    assert resumed[0][1]["export"] == str(two / "model.safetensors") and resumed[1][1]["export"] is None
    assert resumed[0][1]["export_rel_err"] <= 1e-5
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["2", "4"]  # each written once


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_one_step(tmp_path):
    run_dir = tmp_path / "run"
    procs = _launch(tmp_path, "stopped", *RUN, "--run-dir", str(run_dir), "--log-every", "1")
    _wait_for_training(run_dir, procs)
    procs[1][0].send_signal(signal.SIGTERM)  # one process only: JAX's preemption sync tells the other
    stopped = _wait(procs, timeout=600)
    for code, result, stdout, err in stopped:
        assert code == 0, err[-3000:]
        assert result is not None and result["stopped"] == "SIGTERM" and result["export"] is None, err[-3000:]
        assert "[Gloo]" not in stdout and stdout.count("\n") == 1  # library chatter went to stderr
    step = stopped[0][1]["steps"]
    assert stopped[1][1]["steps"] == step and stopped[0][1]["checkpoint"] == stopped[1][1]["checkpoint"]
    assert Path(stopped[0][1]["checkpoint"]).name == str(step)
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir())
    assert saved[-1] == step and all(s % 2 == 0 for s in saved[:-1])  # epoch ends (2 steps), then the stop
    lead_err, other_err = stopped[0][3], stopped[1][3]
    assert "[process 0/2] step 1 (epoch" in lead_err and " step 1 (epoch" not in other_err  # only process 0 logs
    assert "[process 1/2] SIGTERM: saved step" in other_err
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()][:2] == [1, 2]


@pytest.mark.slow
def test_a_dead_process_ends_the_other_within_the_heartbeat_timeout(tmp_path):
    run_dir = tmp_path / "run"
    flags = [*RUN, "--run-dir", str(run_dir), "--log-every", "1", "--heartbeat-timeout", "5"]
    procs = _launch(tmp_path, "dies", *flags)
    _wait_for_training(run_dir, procs)
    killed_at = time.monotonic()
    procs[1][0].kill()
    procs[1][0].wait()
    code, result, _, err = _wait(procs[:1], timeout=120)[0]
    waited = time.monotonic() - killed_at
    assert code == 1 and waited < 60 and "stack trace" not in err, (code, waited, err[-3000:])
    # A step in flight fails at once (gloo's connection to the dead process breaks); between steps the
    # heartbeats stop: either way a sentence and the JSON line.
    lost = "a collective with the other processes failed" in result["error"] or "sent no heartbeat" in result["error"]
    assert lost and "resume the run" in result["error"] and result["error"] in err, err[-3000:]
