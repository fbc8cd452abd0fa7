"""Training under faults, continued: every exit finishes, the run directory's files are checked before use."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import pytest
from conftest import TINY_FLAGS
from orbax.checkpoint._src.futures import future as orbax_futures
from test_train import REPO
from test_train_faults import ONE_EPOCH_FLAGS, _summary

from resnet_train import runlog
from resnet_train.config import saved_config
from resnet_train.main import main

# Flags shared by the runs here: one epoch of the TINY_RUN program, compiled once per session.
RUN_FLAGS = [*TINY_FLAGS, *ONE_EPOCH_FLAGS, "--no-export"]
# Below orbax's 300 s wait for a signal a failed save never sends: a run that hangs there fails the test.
EXIT_SECONDS = 250


def _orbax_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if isinstance(t, orbax_futures._SignalingThread) and t.is_alive()]


def test_a_failed_checkpoint_save_exits_with_its_sentence(tmp_path) -> None:
    (tmp_path / "checkpoints").write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "resnet_train.main", *RUN_FLAGS, "--run-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=EXIT_SECONDS,
    )
    assert proc.returncode == 2, proc.stderr
    assert "cannot finish saving a checkpoint" in _summary(proc.stdout)["error"]
    assert "Traceback" not in proc.stderr and "never awaited" not in proc.stderr, proc.stderr


def test_a_failed_save_on_resume_leaves_no_orbax_thread_waiting(tmp_path, capsys) -> None:
    (tmp_path / "checkpoints").write_text("x")
    assert main([*RUN_FLAGS, "--resume", "--run-dir", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert "cannot finish saving a checkpoint" in _summary(out)["error"] and "Traceback" not in err
    assert _orbax_threads() == []


@pytest.mark.parametrize("kind", ["symlink", "folder", "fifo"])
def test_a_lock_that_is_not_a_regular_file_is_refused_untouched(tmp_path, kind) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / runlog.LOCK_FILE
    {"symlink": lambda: lock.symlink_to(victim), "folder": lock.mkdir, "fifo": lambda: os.mkfifo(lock)}[kind]()
    with pytest.raises(ValueError, match=f"{lock} is not a regular file"), runlog.locked(run_dir):
        pass
    assert victim.read_text() == "precious"


# --- the run directory's files, damaged ---------------------------------------------------------------

WHOLE = '{"step": 10, "loss": 1.0}\n{"epoch": 1, "step": 12}\n'


@pytest.mark.parametrize("torn", ['{"step": 2', '{"step": 2\n', '{"step": 20}', '{"st\x00\x00\n'])
def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog, torn) -> None:
    (tmp_path / runlog.METRICS_FILE).write_text(WHOLE + torn)
    assert runlog.read_metrics(tmp_path) == [{"step": 10, "loss": 1.0}, {"epoch": 1, "step": 12}]
    with caplog.at_level(logging.WARNING):
        runlog.keep_metrics_until(tmp_path, 12)
    assert "dropped a torn last line" in caplog.text
    assert (tmp_path / runlog.METRICS_FILE).read_text() == '{"loss": 1.0, "step": 10}\n{"epoch": 1, "step": 12}\n'


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"step": 1}\n{"st\n' + WHOLE, r"metrics.jsonl, line 2: not JSON"),
        ('{"step": 1}\n[1, 2]\n', r"metrics.jsonl, line 2: a JSON list, not a metrics record"),
        ('"text"\n', r"metrics.jsonl, line 1: a JSON str, not a metrics record"),
    ],
)
def test_other_damage_to_metrics_names_the_file_and_line(tmp_path, text, message) -> None:
    (tmp_path / runlog.METRICS_FILE).write_text(text)
    with pytest.raises(ValueError, match=message):
        runlog.keep_metrics_until(tmp_path, 12)


@pytest.mark.parametrize(
    "text, message", [("garbage", "not JSON"), ("[1, 2]", "a JSON list, not the run's settings"), (b"\xff", "not JSON")]
)
def test_a_config_json_that_is_not_an_object_is_a_sentence_naming_it(tmp_path, text, message) -> None:
    path = tmp_path / runlog.CONFIG_FILE
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        saved_config(path)


def test_a_killed_writes_temporary_file_is_removed_when_the_next_run_starts(tmp_path, capsys) -> None:
    stale = tmp_path / ".model.0123456789ab.tmp.safetensors"  # what atomic_write leaves when killed mid-write
    stale.write_bytes(b"half an export")
    (tmp_path / ".notes.tmp.txt").write_text("the user's")  # not a name atomic_write makes: stays
    assert main([*RUN_FLAGS, "--run-dir", str(tmp_path)]) == 0
    assert not stale.exists() and (tmp_path / ".notes.tmp.txt").exists()
    assert f"{stale}: removing the unfinished file a stopped run left" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name and p.name != ".notes.tmp.txt"]
