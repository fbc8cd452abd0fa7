"""benchmarks/throughput.py runs end to end for a tiny configuration and writes valid JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import throughput  # noqa: E402


def test_tiny_run_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("XLA_FLAGS", "JAX_PLATFORMS", "XLA_PYTHON_CLIENT_PREALLOCATE"):
        monkeypatch.delenv(name, raising=False)  # the benchmark sets them; restore them afterwards
    threads = torch.get_num_threads()  # --torch-threads changes it for the whole process
    out = tmp_path / "bench" / "result.json"
    argv = ["--arch", "resnet18", "--batch", "2", "--size", "32", "--steps", "1", "--warmup", "1", "--repeats", "1"]
    argv += ["--dtype", "fp32", "--device", "cpu", "--impl", "resnet_flax,resnet_torch", "--latency-batches", "2"]
    # One torch thread: on a CPU shared with other test processes, OpenMP barriers between two
    # threads stall for whole scheduler slices and make a tiny eager step take seconds.
    argv += ["--latency-calls", "1", "--torch-threads", "1", "--json", str(out)]
    try:
        assert throughput.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert [p.name for p in out.parent.iterdir()] == ["result.json"]  # no temporary file left behind
    assert report["errors"] == []
    got = {(r["impl"], r["mode"]) for r in report["results"]}
    assert got == {(i, m) for i in ("resnet_flax", "resnet_torch") for m in ("train", "infer")}
    assert all(r["images_per_s"] > 0 and r["batch"] == 2 for r in report["results"])
    assert {(r["impl"], r["batch"]) for r in report["latency"]} == {("resnet_flax", 2), ("resnet_torch", 2)}
    assert {r["over"] for r in report["ratios"]} == {"resnet_torch"}
    assert report["machine"]["cpu_cores"] >= 1 and "jax" in report["machine"]["versions"]
    assert report["machine"]["torch_threads"] == 1
    assert "resnet_flax" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--impl", "resnet_jax"], "--impl"),
        (["--mode", "eval"], "--mode"),
    ],
)
def test_bad_choices_say_what_is_expected(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        throughput.parse_args(argv)


def test_bad_numbers_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        throughput.parse_args(["--batch", "0"])
    assert "--batch must be at least 1" in capsys.readouterr().err


def test_xla_flags_are_opt_in() -> None:
    assert throughput.xla_flags(throughput.parse_args([])) == []
    args = throughput.parse_args(["--xla-gpu-autotune-level", "0", "--xla-gpu-command-buffer", ""])
    assert throughput.xla_flags(args) == ["--xla_gpu_autotune_level=0", "--xla_gpu_enable_command_buffer="]
