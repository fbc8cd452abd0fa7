"""scripts/gpu_check.sh works end to end in its CPU dry run: every step runs, the report is written.

The GPU run itself needs a GPU; this keeps the script, its steps and the summary from rotting. The dry
run (every step tiny, in one process) is run once for the module and its outputs are checked by several
tests; the summary's handling of failed steps is checked on step records written here, without running
any step."""

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
DRY_STEPS = ("environment", "gpu-tests", "parity-fp64", "parity-deep", "train", "speed", "flags")


def _summary_rows(stdout: str) -> dict[str, str]:
    """step name -> status, from the short table printed last."""
    table = stdout[stdout.index("GPU check summary") :].splitlines()[2:]
    return {row.split()[0]: row.split()[1] for row in table if not row.startswith(("full report", "every figure"))}


def _gpu_summary() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_summary", REPO / "scripts" / "gpu_summary.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    """One `gpu_check.sh --dry-run` for every test below that reads its outputs; its logs unpacked."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "OUT": str(out)}
    env.pop("XLA_FLAGS", None)
    run = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    logs = tmp_path_factory.mktemp("gpu-logs")
    with tarfile.open(out / "gpu-logs.tar.gz") as archive:
        archive.extractall(logs, filter="data")
    return run, out, logs / "gpu-logs"


@pytest.mark.slow
def test_dry_run_passes_every_step(dry_run: tuple[subprocess.CompletedProcess[str], Path, Path]) -> None:
    run, out, _ = dry_run
    assert run.returncode == 0, run.stderr
    assert _summary_rows(run.stdout) == {s: "ok" for s in DRY_STEPS}, run.stdout
    # Three files come back from a GPU machine: the report, every figure, the logs.
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check-dry-run-cpu.json", "gpu-check.md", "gpu-logs.tar.gz"]


@pytest.mark.slow
def test_dry_run_writes_the_report(dry_run: tuple[subprocess.CompletedProcess[str], Path, Path]) -> None:
    _, out, logs = dry_run
    report = (out / "gpu-check.md").read_text()
    assert report.startswith("# GPU check: DRY RUN") and "| parity-fp64 | ok |" in report
    combined = json.loads((out / "gpu-check-dry-run-cpu.json").read_text())
    assert [s["name"] for s in combined["steps"]] == list(DRY_STEPS)
    figures = combined["figures"]
    assert figures["parity-fp64"]["passed"] is True and figures["parity-deep"]["passed"] is True
    assert {r["precision"] for run in figures["parity-fp64"]["runs"] for r in run["results"]} == {"fp64"}
    assert figures["speed"]["errors"] == []
    assert {r["impl"] for r in figures["speed"]["results"]} == {"resnet_flax+levers", "resnet_torch"}
    assert {p.name for p in logs.iterdir()} >= {f"{s}.log" for s in DRY_STEPS} | {"steps.tsv", "speed.json"}


@pytest.mark.slow
def test_dry_run_trains_and_exports(dry_run: tuple[subprocess.CompletedProcess[str], Path, Path]) -> None:
    _, out, _ = dry_run
    run = json.loads((out / "gpu-check-dry-run-cpu.json").read_text())["figures"]["train"]
    assert run["exit_code"] == 0 and run["loss_falls"] and run["images_per_s"] > 0
    assert run["export"] and run["export_rel_err"] < 1e-5 and run["export_mismatched_predictions"] == 0
    assert run["command"].startswith("resnet-train --preset imagenet-resnet50 --dataset synthetic")


@pytest.mark.slow
def test_dry_run_tells_an_unknown_flag(dry_run: tuple[subprocess.CompletedProcess[str], Path, Path]) -> None:
    _, out, _ = dry_run
    rows = json.loads((out / "gpu-check-dry-run-cpu.json").read_text())["figures"]["flags"]["rows"]
    assert [(r["flag"], r["status"]) for r in rows] == [
        ("--xla_gpu_enable_command_buffer=", "ok"),
        ("--xla_gpu_flag_no_jaxlib_has=true", "unknown flag"),
    ]


def test_flag_runs_parse_as_the_benchmark_expects(tmp_path: Path) -> None:
    """The GPU-only flag runs: each flag reaches XLA_FLAGS through the benchmark's --xla-flag."""
    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_steps

    from benchmarks import throughput

    for flag in gpu_steps.XLA_GPU_FLAGS:
        args = throughput.parse_args(gpu_steps.flag_argv(flag, tmp_path / "f.json"))
        assert throughput.xla_flags(args) == [flag]
        assert (args.impls, args.modes, args.batch, args.dtype) == (["resnet_flax"], ["train"], 256, "bf16")


def test_unknown_argument_is_refused(tmp_path: Path) -> None:
    run = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--fast"],
        cwd=REPO,
        env={**os.environ, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "expected --dry-run or nothing" in run.stderr
    assert list(tmp_path.iterdir()) == []  # refused before anything is written


def test_summary_reports_failed_and_timed_out_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logs = tmp_path / "gpu-logs"
    logs.mkdir()
    (logs / "environment.log").write_text("Card A, driver 1\npython 3\n")
    (logs / "train.log").write_text("step 1\nTraceback: boom\n")
    records = [("environment", "0", "3"), ("parity-deep", "124", "80"), ("train", "1", "7")]
    (logs / "steps.tsv").write_text("".join(f"{n}\t{rc}\t{s}\tcommand of {n}\n" for n, rc, s in records))
    summary = _gpu_summary()
    argv = ["--steps", str(logs / "steps.tsv"), "--report-dir", str(tmp_path), "--mode", "gpu", "--report", "r.md"]
    assert summary.main(argv) == 0
    printed = capsys.readouterr().out
    assert _summary_rows(printed) == {"environment": "ok", "parity-deep": "TIMEOUT", "train": "FAIL"}
    assert "no JSON written" in printed and "Traceback: boom" in printed
    report = (tmp_path / "r.md").read_text()
    assert report.startswith("# GPU check\n") and "Card A, driver 1" in report
    assert "| parity-deep | TIMEOUT | 80 | no JSON written |" in report
    assert "## train: FAIL (rc 1), 7 s" in report and "`command of train`" in report
    combined = json.loads((tmp_path / "gpu-check-card-a.json").read_text())
    assert [s["status"] for s in combined["steps"]] == ["ok", "TIMEOUT", "FAIL (rc 1)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-check-card-a.json", "gpu-logs", "r.md"]


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
