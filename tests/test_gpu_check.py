"""scripts/gpu_check.sh works end to end in its CPU dry run: every step runs, the report is written.

The GPU run itself needs a GPU; this keeps the script, its steps and the summary from rotting."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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


@pytest.mark.slow
def test_dry_run_writes_the_report(tmp_path: Path) -> None:
    run = _dry_run(tmp_path)
    assert run.returncode == 0, run.stderr
    steps = _summary_rows(run.stdout)
    names = ("environment", "gpu-tests", "parity-check", "throughput-headline", "convert-speed", "train-resnet50")
    assert steps == {s: "ok" for s in names}
    report = (tmp_path / "parity-gpu.md").read_text()
    assert report.startswith("# GPU check: DRY RUN") and "| parity-check | ok |" in report
    assert json.loads((tmp_path / "parity-gpu.json").read_text())["passed"] is True
    runs = json.loads((tmp_path / "train-gpu.json").read_text())["runs"]
    assert [(r["dataset"], r["exit_code"], r["loss_falls"]) for r in runs] == [
        ("synthetic", 0, True),
        ("imagefolder", 0, True),
    ]
    with tarfile.open(tmp_path / "gpu-logs.tar.gz") as logs:
        assert "gpu-logs/steps.tsv" in logs.getnames()
    assert not (tmp_path / "gpu-logs").exists()


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
