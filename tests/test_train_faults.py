"""Training under faults: bad numbers, a busy or broken run directory, damaged checkpoints, signals, full disks.

Nothing is lost, nothing silently wrong, and every exit of `resnet-train` ends with its JSON line.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import TINY_FLAGS, TINY_RUN
from test_train import REPO, _config, _leaves

from resnet_train import export, loop, runlog
from resnet_train.checkpoint import DamagedCheckpointError, load_variables
from resnet_train.config import TrainConfig
from resnet_train.export import EXPORT_FILE
from resnet_train.loop import NonFiniteLossError, fit
from resnet_train.main import main
from resnet_train.runlog import RunDirBusyError, read_metrics

STEPS_PER_EPOCH = 192 // 16
# The runs here train one program wherever they can (a run's epochs set its schedule, so they keep the
# default 2 and stop after the first with stop_after_epoch): XLA compiles it once per session.
ONE_EPOCH = dict(epochs=2, stop_after_epoch=1)
ONE_EPOCH_FLAGS = ["--epochs", "2", "--stop-after-epoch", "1"]


def _epochs(run_dir: Path) -> list[int]:
    """The epochs metrics.jsonl records (its --log-every step lines left out)."""
    return [r["epoch"] for r in read_metrics(run_dir) if "epoch" in r]


def _summary(out: str) -> dict:
    """The JSON line `resnet-train` prints last."""
    return json.loads(out.strip().splitlines()[-1])


# --- numbers that would reach the weights ---------------------------------------------------------


@pytest.mark.parametrize(
    "field", ["lr", "momentum", "weight_decay", "warmup_epochs", "label_smoothing", "test_fraction"]
)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e39])
def test_every_float_option_must_be_finite(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize(
    "field, value, rule",
    [
        ("momentum", 1.0, r"in \[0, 1\)"),
        ("momentum", -0.1, r"in \[0, 1\)"),
        ("lr", 0.0, "> 0"),
        ("weight_decay", -1e-4, ">= 0"),
        ("seed", -1, ">= 0"),
        ("epochs", 1.5, "int"),
        ("batch_size", True, "int"),
        ("nesterov", 1, "bool"),
        ("inject_nan_at_step", -2, ">= -1"),
    ],
)
def test_options_out_of_range_or_of_the_wrong_type_are_refused(field: str, value, rule: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be {rule}"):
        TrainConfig(**{field: value})


def test_a_nan_flag_exits_2_with_the_json_line(capsys) -> None:
    assert main(["--lr", "nan"]) == 2
    out, err = capsys.readouterr()
    assert "lr must be a finite number" in err and "lr must be a finite number" in _summary(out)["error"]


def test_updates_that_would_make_weights_non_finite_are_skipped(tmp_path) -> None:
    """At lr 3.4e38 (float32's largest) loss and gradients stay finite; updates of gradients above ~0.5 do not."""
    config = _config(tmp_path, epochs=1, lr=3.4e38, warmup_epochs=0, on_nonfinite="skip")
    result = fit(config)
    assert result["skipped_updates"] == STEPS_PER_EPOCH
    assert all(np.isfinite(x).all() for x in _leaves(load_variables(result["checkpoint"])))
    # The export holds the (finite) weights it was checked with.
    assert Path(result["export"]).exists() and result["export_mismatched_predictions"] == 0


def test_a_non_finite_stop_names_the_checkpoint_that_holds_the_run(tmp_path) -> None:
    with pytest.raises(NonFiniteLossError, match=r"at step 13 .*checkpoints/12, holds the finite state of step 12"):
        fit(_config(tmp_path, epochs=2, inject_nan_at_step=13, export=False))


def test_a_non_finite_stop_exits_1_with_the_json_line(tmp_path, capsys) -> None:
    # Step 3, as in test_train.py's NaN tests: the same program.
    assert main([*TINY_FLAGS, "--run-dir", str(tmp_path), "--inject-nan-at-step", "3"]) == 1
    out, err = capsys.readouterr()
    error = _summary(out)["error"]
    assert "at step 3 " in error and "no checkpoint has been saved yet" in error and "Traceback" not in err


def test_an_export_that_fails_its_check_is_never_at_its_path(tmp_path, monkeypatch) -> None:
    def wrong(*args, **kwargs):
        return export.ExportCheck(rel_err=0.5, mismatched_predictions=3, images=10)

    monkeypatch.setattr(export, "verify_export", wrong)
    with pytest.raises(export.ExportMismatchError, match="model.safetensors was not written"):
        fit(_config(tmp_path, **ONE_EPOCH))
    assert not (tmp_path / EXPORT_FILE).exists() and not list(tmp_path.glob(".*tmp*"))


# --- one run per run directory -----------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from resnet_train.runlog import locked
    with locked(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(600)
    """
)


def test_a_second_run_in_the_same_run_dir_fails_at_once_naming_the_holder(tmp_path, monkeypatch) -> None:
    def unreachable(config, mesh):
        raise AssertionError("the data was opened before the run directory was locked")

    monkeypatch.setattr(loop, "open_feed", unreachable)
    with runlog.locked(tmp_path), pytest.raises(RunDirBusyError, match=f"in use by another run .process {os.getpid()}"):
        fit(_config(tmp_path, epochs=1))
    with subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE) as holder:
        try:
            assert holder.stdout.readline().strip() == b"locked"
            with pytest.raises(RunDirBusyError, match=f"process {holder.pid}"):
                fit(_config(tmp_path, epochs=1))
        finally:
            holder.kill()  # SIGKILL: no cleanup code runs, the kernel drops the lock with the process
    with runlog.locked(tmp_path):
        assert (tmp_path / runlog.LOCK_FILE).read_text().strip() == str(os.getpid())


# --- resuming --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    """A run of 2 epochs: checkpoints at steps 12 and 24, two metrics lines."""
    run_dir = tmp_path_factory.mktemp("two") / "run"
    fit(_config(run_dir, epochs=2, export=False))
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def _resume(run_dir: str | Path, **kw) -> dict:
    """Resume up to the end of epoch 2 of 2: from step 24, setup and restore only."""
    config = TrainConfig(**{**TINY_RUN, "run_dir": str(run_dir), "epochs": 2, "export": False})
    return fit(dataclasses.replace(config, resume=True, **kw))


def test_resume_from_any_spelling_of_a_moved_run_dir(two_checkpoints, tmp_path, monkeypatch) -> None:
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.copytree(two_checkpoints, moved)
    monkeypatch.chdir(moved.parent)
    for spelling in ("./run", "run/", str(moved)):
        result = _resume(spelling)
        assert (result["steps"], result["epochs"]) == (24, 2), spelling
    assert _epochs(moved) == [1, 2]


def _data_files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d")


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(two_checkpoints, tmp_path, caplog, capfd) -> None:
    run_dir = _copy(two_checkpoints, tmp_path)
    for data in _data_files(run_dir / "checkpoints" / "24"):
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        result = _resume(run_dir)  # from step 12: epoch 2 again, saved at step 24 again
    assert (result["steps"], result["epochs"]) == (24, 2)
    assert f"{run_dir / 'checkpoints' / '24'} cannot be restored" in caplog.messages[0]
    assert "tensorstore_spec" not in caplog.messages[0]  # one sentence, not the storage's JSON
    assert "moved the damaged checkpoint of step 24" in caplog.messages[1]
    # step 20 (--log-every 10) and epoch 2
    assert "metrics.jsonl: dropped 2 lines past step 12" in caplog.messages[2]
    assert len(caplog.messages) == 3 and "Traceback" not in capfd.readouterr().err
    assert [p.name.split(".")[0] for p in (run_dir / "checkpoints-damaged").iterdir()] == ["24"]
    assert _epochs(run_dir) == [1, 2]
    assert _resume(run_dir)["steps"] == 24  # the new step 24 restores


def test_changed_checkpoint_arrays_are_refused_by_their_digest(two_checkpoints, tmp_path, caplog) -> None:
    run_dir = _copy(two_checkpoints, tmp_path)
    item = run_dir / "checkpoints" / "24" / "default"
    tree = ocp.StandardCheckpointer().restore(item)
    tree["params"]["fc"]["bias"] = tree["params"]["fc"]["bias"] + 1  # a valid checkpoint of other weights
    shutil.rmtree(item)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(item, tree)
    with pytest.raises(DamagedCheckpointError, match="checkpoints/24: corrupted: the arrays differ from the sha256"):
        load_variables(item.parent)
    with caplog.at_level(logging.WARNING):
        assert _resume(run_dir, stop_after_epoch=1)["steps"] == 12
    assert "corrupted: the arrays differ from the sha256 recorded at save time" in caplog.messages[0]


def test_flipped_bits_in_a_checkpoint_never_resume_silently(two_checkpoints, tmp_path, capfd) -> None:
    """Either orbax cannot decode the arrays or they differ from their digest: a warning, not tracebacks."""
    run_dir = _copy(two_checkpoints, tmp_path)
    for data in _data_files(run_dir / "checkpoints" / "24"):
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        data.write_bytes(bytes(raw))
    assert _resume(run_dir, stop_after_epoch=1)["steps"] == 12
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err


def test_a_failed_resume_leaves_the_run_as_it_was(two_checkpoints, tmp_path) -> None:
    run_dir = _copy(two_checkpoints, tmp_path)
    for step in ("12", "24"):
        shutil.rmtree(run_dir / "checkpoints" / step / "default")
    config_before = (run_dir / "config.json").read_bytes()
    with pytest.raises(ValueError, match="no checkpoint of this run can be restored"):
        _resume(run_dir, progress=True)  # progress is a resumable change: it would be recorded
    assert (run_dir / "config.json").read_bytes() == config_before
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["12", "24"]
    assert _epochs(run_dir) == [1, 2]


def test_a_resume_without_config_json_is_refused_and_writes_none(two_checkpoints, tmp_path) -> None:
    run_dir = _copy(two_checkpoints, tmp_path)
    (run_dir / runlog.CONFIG_FILE).unlink()
    with pytest.raises(ValueError, match="config.json is missing, so this run's settings cannot be checked"):
        _resume(run_dir, lr=0.5)
    assert not (run_dir / runlog.CONFIG_FILE).exists()


KILL_DURING_FIRST_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import orbax.checkpoint as ocp
    from resnet_train.main import main

    real_save = ocp.CheckpointManager.save

    def save_and_die(self, *args, **kwargs):
        real_save(self, *args, **kwargs)  # asynchronous: the arrays are still being written
        os.kill(os.getpid(), signal.SIGKILL)

    ocp.CheckpointManager.save = save_and_die
    sys.exit(main(sys.argv[1:]))
    """
)


def test_sigkill_during_the_first_checkpoint_resumes_from_step_0_saying_so(tmp_path, caplog) -> None:
    flags = [*TINY_FLAGS, *ONE_EPOCH_FLAGS, "--no-export", "--run-dir", str(tmp_path)]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DURING_FIRST_SAVE, *flags], cwd=REPO, capture_output=True, timeout=600
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _epochs(tmp_path) == [1]  # recorded just before the checkpoint
    config = TrainConfig(**{**TINY_RUN, **ONE_EPOCH, "run_dir": str(tmp_path), "export": False})
    with caplog.at_level(logging.WARNING):
        result = fit(dataclasses.replace(config, resume=True))
    assert any("no complete checkpoint" in m and "starting from step 0" in m for m in caplog.messages)
    assert result["steps"] == STEPS_PER_EPOCH
    assert _epochs(tmp_path) == [1]


# --- signals before the loop and during the export check ----------------------------------------------


def test_sigterm_before_the_loop_exits_cleanly_with_the_json_line(tmp_path, monkeypatch, capsys) -> None:
    real = loop.open_feed

    def signalled(config, mesh):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(config, mesh)

    monkeypatch.setattr(loop, "open_feed", signalled)
    assert main([*TINY_FLAGS, "--run-dir", str(tmp_path)]) == 0
    result = _summary(capsys.readouterr().out)
    assert (result["stopped"], result["steps"], result["export"]) == ("SIGTERM", 0, None)
    assert not (tmp_path / EXPORT_FILE).exists()


def test_a_signal_during_the_export_check_leaves_no_export(tmp_path, monkeypatch) -> None:
    real = export.verify_export

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "verify_export", signalled)
    result = fit(_config(tmp_path, **ONE_EPOCH))
    assert (result["stopped"], result["export"], result["steps"]) == ("SIGINT", None, STEPS_PER_EPOCH)
    assert not (tmp_path / EXPORT_FILE).exists() and not list(tmp_path.glob(".*tmp*"))


def _imports_loaded(pid: int) -> bool:
    """True once the process has mapped jax's or torch's libraries: it is past main()'s first line."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "jaxlib" in maps or "libtorch" in maps


def test_ctrl_c_while_importing_exits_cleanly_with_the_json_line(tmp_path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnet_train.main", *TINY_FLAGS, "--run-dir", str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not _imports_loaded(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "Traceback" not in err, err
    result = _summary(out)
    assert (result["stopped"], result["steps"], result["export"]) == ("SIGINT", 0, None)


# --- sentences instead of tracebacks --------------------------------------------------------------


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_under_the_run_dir_is_a_sentence(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(os, "fsync", _no_space)
    assert main([*TINY_FLAGS, "--run-dir", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    expected = f"{tmp_path / 'config.json'}: No space left on device"
    assert expected in err and _summary(out)["error"] == expected and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["lock"]


def test_a_checkpoint_that_cannot_be_saved_is_a_sentence(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(ocp.CheckpointManager, "save", _no_space)
    assert main([*TINY_FLAGS, *ONE_EPOCH_FLAGS, "--no-export", "--run-dir", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert "checkpoints/12: cannot save the checkpoint" in _summary(out)["error"] and "Traceback" not in err


def test_a_run_dir_that_is_a_file_or_read_only_is_a_sentence(tmp_path, monkeypatch, capsys) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("mine")
    assert main([*TINY_FLAGS, "--run-dir", str(not_a_dir)]) == 2
    out, err = capsys.readouterr()
    assert "is a file, not a folder" in _summary(out)["error"] and not_a_dir.read_text() == "mine"

    real_open = os.open
    read_only = tmp_path / "read-only"
    read_only.mkdir()

    def refuse(path, *args, **kwargs):  # as a read-only mount would (root ignores permission bits)
        if Path(path).parent == read_only:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    assert main([*TINY_FLAGS, "--run-dir", str(read_only)]) == 2
    out, err = capsys.readouterr()
    assert _summary(out)["error"] == f"{read_only / 'lock'}: Read-only file system" and "Traceback" not in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--test-fraction", "0.001"], "the test split is empty"),
        (["--train-limit", "8"], "batch size 16 is larger than the 8 training images"),
    ],
)
def test_a_dataset_too_small_is_refused_before_training(tmp_path, capsys, flags, message) -> None:
    assert main([*TINY_FLAGS, *flags, "--run-dir", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert message in _summary(out)["error"] and "Traceback" not in err
    assert not (tmp_path / "checkpoints").exists()
