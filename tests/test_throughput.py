"""benchmarks/throughput.py runs end to end for a tiny configuration and writes valid JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import throughput  # noqa: E402

# The smallest model the benchmarks time (8x8 images through the small stem, 10 classes): every test here runs
# it, so the programs one compiles serve the others.
TINY = ["--small-stem", "--batch", "2", "--size", "8", "--num-classes", "10"]


def test_tiny_run_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("XLA_FLAGS", "JAX_PLATFORMS", "XLA_PYTHON_CLIENT_PREALLOCATE"):
        monkeypatch.delenv(name, raising=False)  # the benchmark sets them; restore them afterwards
    threads = torch.get_num_threads()  # --torch-threads changes it for the whole process
    out = tmp_path / "bench" / "result.json"
    argv = ["--arch", "resnet18", *TINY, "--steps", "1", "--warmup", "1", "--repeats", "1"]
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


def test_interleaved_repeats_rotate_the_order() -> None:
    """Round r starts with step r: no implementation always runs first (or after the same one)."""
    from benchmarks.common import Step, time_interleaved

    calls: list[str] = []
    steps = [
        Step(name, "train", lambda n=name: calls.append(n), lambda: None, steps_per_call=k)
        for name, k in (("a", 1), ("b", 2), ("c", 1))
    ]
    timings = time_interleaved(steps, [1.0, 2.0, 3.0], calls=2, repeats=3)
    rounds = ["".join(calls[i : i + 6 : 2]) for i in range(0, 18, 6)]
    assert rounds == ["abc", "bca", "cab"]
    assert [t["first_step_s"] for t in timings] == [1.0, 2.0, 3.0]
    assert all(len(t["step_s_all"]) == 3 for t in timings)


def test_interleaved_run_reports_every_implementation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("XLA_FLAGS", "JAX_PLATFORMS", "XLA_PYTHON_CLIENT_PREALLOCATE"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "interleaved.json"
    argv = ["--arch", "resnet18", *TINY, "--steps", "1", "--warmup", "1", "--repeats", "2"]
    argv += ["--dtype", "fp32", "--device", "cpu", "--impl", "resnet_flax,resnet_flax_plain", "--mode", "train"]
    argv += ["--latency-batches", "", "--interleave", "--flax-steps-per-call", "2", "--json", str(out)]
    assert throughput.main(argv) == 0
    report = json.loads(out.read_text())
    assert [(r["impl"], r["steps_per_call"], len(r["step_ms_all"])) for r in report["results"]] == [
        ("resnet_flax", 2, 2),
        ("resnet_flax_plain", 2, 2),
    ]
    assert [(r["impl"], r["over"]) for r in report["ratios"]] == [("resnet_flax", "resnet_flax_plain")]


def test_nnx_rows_time_the_small_stem_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways of jitting the NNX model run beside the linen model, with ratios to it (inference here; the
    train rows run in test_nnx_compiles_to_the_linen_program)."""
    for name in ("XLA_FLAGS", "JAX_PLATFORMS", "XLA_PYTHON_CLIENT_PREALLOCATE"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "nnx.json"
    impls = "resnet_flax,resnet_flax_nnx,resnet_flax_nnx+nnx.jit"
    argv = ["--arch", "resnet18", *TINY]
    argv += ["--steps", "1", "--warmup", "1", "--repeats", "1", "--dtype", "fp32", "--device", "cpu"]
    argv += ["--impl", impls, "--mode", "infer", "--latency-batches", "", "--interleave", "--json", str(out)]
    assert throughput.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["errors"] == [] and report["config"]["small_stem"] is True
    assert [(r["impl"], r["mode"]) for r in report["results"]] == [(i, "infer") for i in impls.split(",")]
    assert [(r["impl"], r["over"]) for r in report["ratios"]] == [(i, "resnet_flax") for i in impls.split(",")[1:]]
    with pytest.raises(SystemExit):
        throughput.parse_args(["--small-stem", "--impl", "torchvision,resnet_flax"])


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_nnx_compiles_to_the_linen_program(mode: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same work (XLA's flop and byte counts); inference the same operations, the train step a few more
    (nnx.Optimizer counts its steps)."""
    from benchmarks import nnx_programs

    out = tmp_path / "programs.json"
    argv = ["--arch", "resnet18", *TINY]
    assert nnx_programs.main([*argv, "--mode", mode, "--calls", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    linen, nnx = report["programs"]["linen"], report["programs"]["nnx"]
    for key in ("flops", "bytes_accessed"):
        assert nnx[key] == pytest.approx(linen[key], rel=1e-6), key
    assert linen["ops_total"] > 100
    extra = [in_nnx - in_linen for in_linen, in_nnx in report["differing_ops"].values()]
    if mode == "infer":
        assert extra == []
    else:  # nnx.Optimizer counts its steps: an add, and the parameter that carries the count
        assert all(n >= 0 for n in extra) and sum(extra) <= 10
    assert set(report["host_ms_per_call"]) == {"resnet_flax", "resnet_flax_nnx", "resnet_flax_nnx+nnx.jit"}
    assert "host per call" in capsys.readouterr().out
