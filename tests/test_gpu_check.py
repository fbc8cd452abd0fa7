"""scripts/gpu_check.sh works end to end in its CPU dry run: every step runs, the report is written.

The GPU run itself needs a GPU; this keeps the script, its steps and the summary from rotting. The dry
run is run once for the module and its outputs are checked by several tests; the summary's handling of
failed steps is checked on step records written here, without running any step."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
DRY_STEPS = ("environment", "gpu-tests", "parity-check", "throughput-headline", "convert-speed", "train-resnet50")


def _dry_run(out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OUT": str(out), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run", *flags],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _summary_rows(stdout: str) -> dict[str, str]:
    """step name -> status, from the short table printed last."""
    table = stdout[stdout.index("GPU check summary") :].splitlines()[2:]
    return {row.split()[0]: row.split()[1] for row in table if not row.startswith("full report")}


def _gpu_summary() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_summary", REPO / "scripts" / "gpu_summary.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One `gpu_check.sh --dry-run` for every test below that reads its outputs."""
    out = tmp_path_factory.mktemp("gpu-check")
    return _dry_run(out), out


@pytest.mark.slow
def test_dry_run_passes_every_step(dry_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    run, _ = dry_run
    assert run.returncode == 0, run.stderr
    assert _summary_rows(run.stdout) == {s: "ok" for s in DRY_STEPS}, run.stdout


@pytest.mark.slow
def test_dry_run_writes_the_report(dry_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, out = dry_run
    report = (out / "parity-gpu.md").read_text()
    assert report.startswith("# GPU check: DRY RUN") and "| parity-check | ok |" in report
    assert json.loads((out / "parity-gpu.json").read_text())["passed"] is True
    headline = json.loads((out / "throughput-headline.json").read_text())
    assert headline["errors"] == []
    assert {(r["impl"], r["mode"]) for r in headline["results"]} == {
        (i, m) for i in ("resnet_flax", "resnet_torch", "resnet_flax_plain") for m in ("train", "infer")
    }


@pytest.mark.slow
def test_dry_run_trains_on_both_datasets(dry_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, out = dry_run
    runs = json.loads((out / "train-gpu.json").read_text())["runs"]
    assert [(r["dataset"], r["exit_code"], r["loss_falls"]) for r in runs] == [
        ("synthetic", 0, True),
        ("imagefolder", 0, True),
    ]
    assert all(r["images_per_s"] > 0 for r in runs)


@pytest.mark.slow
def test_dry_run_archives_every_log(dry_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, out = dry_run
    with tarfile.open(out / "gpu-logs.tar.gz") as logs:
        names = set(logs.getnames())
    assert {"gpu-logs/steps.tsv"} | {f"gpu-logs/{s}.log" for s in DRY_STEPS} <= names
    assert not (out / "gpu-logs").exists()


@pytest.mark.slow
def test_levers_dry_run_measures_both_models(tmp_path: Path) -> None:
    run = _dry_run(tmp_path, "--levers")
    assert run.returncode == 0, run.stderr
    # The base step only: the other levers run on a GPU (scripts/gpu_check.sh says why).
    assert _summary_rows(run.stdout) == {"environment": "ok", "throughput-levers-base": "ok"}
    report = json.loads((tmp_path / "throughput-levers-base.json").read_text())
    rows = {(r["impl"], r["mode"], r["steps_per_call"]) for r in report["results"]}
    assert rows == {("resnet_flax", "train", 1), ("resnet_flax_plain", "train", 1)}
    assert report["errors"] == []
    assert (tmp_path / "gpu-levers.md").read_text().startswith("# GPU check: DRY RUN")


def test_unknown_argument_is_refused(tmp_path: Path) -> None:
    run = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--fast"],
        cwd=REPO,
        env={**os.environ, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "expected --dry-run and/or --levers" in run.stderr
    assert list(tmp_path.iterdir()) == []  # refused before anything is written


def test_summary_reports_failed_and_timed_out_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logs = tmp_path / "gpu-logs"
    logs.mkdir()
    (logs / "environment.log").write_text("card A, driver 1\npython 3\n")
    (logs / "convert-speed.log").write_text("resnet18 torchvision 0.1\nTraceback: boom\n")
    records = [("environment", "0", "3"), ("parity-check", "124", "80"), ("convert-speed", "1", "7")]
    (logs / "steps.tsv").write_text("".join(f"{n}\t{rc}\t{s}\tcommand of {n}\n" for n, rc, s in records))
    summary = _gpu_summary()
    argv = ["--steps", str(logs / "steps.tsv"), "--report-dir", str(tmp_path), "--mode", "gpu", "--report", "r.md"]
    assert summary.main(argv) == 0
    printed = capsys.readouterr().out
    assert _summary_rows(printed) == {"environment": "ok", "parity-check": "TIMEOUT", "convert-speed": "FAIL"}
    assert "no JSON written" in printed and "Traceback: boom" in printed
    report = (tmp_path / "r.md").read_text()
    assert report.startswith("# GPU check\n") and "card A, driver 1" in report
    assert "| parity-check | TIMEOUT | 80 | no JSON written |" in report
    assert "## convert-speed: FAIL (rc 1), 7 s" in report and "`command of convert-speed`" in report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-logs", "r.md"]  # no temporary file left


def test_summary_imports_no_framework() -> None:
    """The report is written even where torch or jax cannot be imported."""
    code = (
        "import runpy, sys; runpy.run_path(sys.argv[1]); "
        "print(sorted(m for m in ('torch', 'jax', 'flax') if m in sys.modules))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "scripts" / "gpu_summary.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
