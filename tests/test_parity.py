"""Parity checks on the CPU: both frameworks compute the same function at every depth.

fp64 proves the semantics (eval, train mode, running statistics, gradients, 3 SGD steps agree to
1e-10); fp32 bounds the rounding. Gradient and SGD checks run where they are affordable and well
conditioned: a deep network in train mode on tiny inputs amplifies rounding (ResNet-50 at
2x3x33x47: torch fp32 against torch fp64 already differs by 3e-2 in its gradients, and 3 fp64 SGD
steps drift to 3e-10), and resnet152's train-step compile alone costs about 35 CPU-seconds.
"""

from __future__ import annotations

import json

import numpy as np
import optax
import pytest
import torch

from parity.checks import CheckResult, Pair, check_pair, linen, make_pair, run_checks
from parity.checks.compare import errors
from parity.checks.linen import LinenSide
from parity.checks.nnx import NnxSide
from parity.checks.optim import torch_sgd
from parity.checks.precision import (
    BF16,
    CHECKS,
    CPU,
    EVAL,
    FP32,
    FP64,
    GPU,
    GRADIENTS,
    MODES,
    RUNNING_STATS,
    SGD,
    TF32,
    TRAIN_LOGITS,
    applied,
    precisions_for,
    torch_tf32_summary,
)
from parity.cli import main
from resnet_arch import LINEN, NNX, STAGE_OUTPUTS

FORWARD = (EVAL, TRAIN_LOGITS, RUNNING_STATS)
# depth -> (odd, non-square input size, checks in fp64, checks in fp32)
MATRIX = {
    "resnet18": ((33, 47), CHECKS, CHECKS),
    "resnet34": ((47, 33), FORWARD, FORWARD),
    "resnet50": ((33, 47), (*FORWARD, GRADIENTS), FORWARD),
    # More of resnet50's bottleneck blocks: each checked once, the fp32 rounding at one, fp64's semantics at the other.
    "resnet101": ((35, 29), (), (EVAL,)),
    "resnet152": ((33, 47), FORWARD, ()),
}
# (depth, precision) pairs with checks to run.
MATRIX_CASES = [
    (arch, p) for arch, (_, *checks) in MATRIX.items() for p, c in zip((FP64, FP32), checks, strict=True) if c
]
BATCH = 2


def _assert_all_pass(results: list[CheckResult], wanted: tuple[str, ...]) -> None:
    assert [r.check for r in results] == [c for c in CHECKS if c in wanted]
    for r in results:
        where = f"{r.arch} {r.precision} {r.check}"
        assert r.passed, f"{where}: rel {r.rel:.3e} > {r.tol:.0e}, first diverging {r.first_diverging}"
        assert set(r.stage_errors) == set(STAGE_OUTPUTS)


# Before the matrix: its resnet18 fp64 run then reuses these tests' compiled functions.
def _perturbed_pair(stage: str) -> Pair:
    pair = make_pair("resnet18", FP64, CPU, seed=3)
    with torch.no_grad():
        getattr(pair.torch_model, stage)[1].residual_function[0].weight[0, 0, 1, 1] += 0.5
    return pair


def test_perturbed_conv4_weight_names_conv4_x() -> None:
    with applied(MODES[FP64], CPU):
        results = check_pair(_perturbed_pair("conv4_x"), (33, 47), BATCH, seed=3)
    assert [r.check for r in results] == list(CHECKS)
    for r in results:
        assert not r.passed, r.check
        assert r.first_diverging == "conv4_x", (r.check, r.stage_basis, r.stage_errors)
    eval_errors = results[0].stage_errors
    assert max(eval_errors[s] for s in ("conv1", "conv2_x", "conv3_x")) < 1e-12
    assert eval_errors["conv4_x"] > 1e-6


def test_running_mean_bug_fails_eval_and_stats_but_not_train_logits() -> None:
    """A wrong running mean in conv2_x: eval and the new running stats diverge there; train mode does not."""
    with applied(MODES[FP64], CPU):
        pair = make_pair("resnet18", FP64, CPU, seed=4)
        with torch.no_grad():
            pair.torch_model.conv2_x[0].residual_function[1].running_mean[3] += 1.0
        results = {r.check: r for r in check_pair(pair, (33, 47), BATCH, seed=4, checks=FORWARD)}
    assert results[EVAL].first_diverging == "conv2_x"
    assert results[RUNNING_STATS].first_diverging == "conv2_x"
    assert results[TRAIN_LOGITS].passed


@pytest.mark.parametrize("side, api", [(LinenSide, LINEN), (NnxSide, NNX)])
def test_nan_gradient_fails_gradients_at_its_stage_without_raising(monkeypatch, side, api) -> None:
    """A Flax train step whose gradient of one conv3_x kernel is NaN: a failed gradients check whose
    diagnosis names conv3_x (the results are compared by the name rule, not refused by the converter)."""
    real = side.train_step

    def nan_in_conv3(self, params, batch_stats, x, y, with_gradients):
        grads, batch_stats, stages = real(self, params, batch_stats, x, y, with_gradients)
        conv = grads["conv3_x"]["0"]["residual_function"]["0"]
        conv["kernel"] = conv["kernel"].at[0, 0, 0, 0].set(float("nan"))
        return grads, batch_stats, stages

    monkeypatch.setattr(side, "train_step", nan_in_conv3)
    with applied(MODES[FP64], CPU):
        pair = make_pair("resnet18", FP64, CPU, seed=3, api=api)
        results = {r.check: r for r in check_pair(pair, (33, 47), BATCH, seed=3, checks=(*FORWARD, GRADIENTS))}
    assert results[TRAIN_LOGITS].passed and results[RUNNING_STATS].passed
    grads = results[GRADIENTS]
    assert not grads.passed and np.isnan(grads.rel)
    assert grads.first_diverging == "conv3_x", (grads.stage_basis, grads.stage_errors)
    assert all(grads.stage_errors[s] < 1e-10 for s in ("fc", "conv5_x", "conv4_x"))


@pytest.mark.parametrize(("arch", "precision"), MATRIX_CASES)
def test_cpu_matrix(arch: str, precision: str) -> None:
    size, fp64_checks, fp32_checks = MATRIX[arch]
    wanted = fp64_checks if precision == FP64 else fp32_checks
    results = run_checks(arch, CPU, precision, size, BATCH, seed=1, checks=wanted)
    _assert_all_pass(results, wanted)


@pytest.mark.parametrize("precision", [TF32, BF16])
def test_gpu_modes_on_cpu(precision: str) -> None:
    """The TF32-default and bf16 code paths (autocast, bf16 Flax compute) run and agree on the CPU."""
    results = run_checks("resnet18", CPU, precision, (33, 47), BATCH, seed=2)
    _assert_all_pass(results, tuple(MODES[precision].tolerances))
    if precision == BF16:
        # bf16 really was used: fp32 agrees to ~1e-6, bf16 rounding leaves far more.
        assert results[0].rel > 1e-4


def test_errors_are_relative_over_all_tensors() -> None:
    rng = np.random.default_rng(5)
    ref = [rng.standard_normal((3, 5)), rng.standard_normal(7)]
    noise = [rng.standard_normal(r.shape) * 1e-3 for r in ref]
    max_abs, rel = errors([r + n for r, n in zip(ref, noise, strict=True)], ref)
    flat_ref, flat_noise = np.concatenate([r.ravel() for r in ref]), np.concatenate([n.ravel() for n in noise])
    assert max_abs == pytest.approx(np.abs(flat_noise).max())
    assert rel == pytest.approx(np.linalg.norm(flat_noise) / np.linalg.norm(flat_ref))
    with pytest.raises(ValueError, match="cannot compare shapes"):
        errors([ref[0]], [ref[1]])


def test_nan_never_passes_and_first_diverging_is_in_stage_order() -> None:
    stages = {"conv1": 1e-9, "conv2_x": 5e-3, "conv3_x": float("nan"), "fc": 1.0}
    r = CheckResult("resnet18", FP32, CPU, EVAL, 1.0, float("nan"), 1e-5, stages, "forward outputs (eval mode)")
    assert not r.passed
    assert r.first_diverging == "conv2_x"
    ok = CheckResult("resnet18", FP32, CPU, EVAL, 0.0, 1e-7, 1e-5, stages, "forward outputs (eval mode)")
    assert ok.passed and ok.first_diverging is None
    assert json.loads(json.dumps(r.to_json(), allow_nan=True))["passed"] is False


def test_floor_widens_the_limit_only_to_twice_torchs_own_error() -> None:
    stages = {"conv1": 1e-3, "fc": 1e-3}
    r = CheckResult("resnet50", FP32, CPU, GRADIENTS, 1.0, 3e-2, 1e-3, stages, "tensors", floor=2e-2)
    assert r.limit == pytest.approx(4e-2) and r.passed
    worse = CheckResult("resnet50", FP32, CPU, GRADIENTS, 1.0, 5e-2, 1e-3, stages, "tensors", floor=2e-2)
    assert not worse.passed
    unmeasured = CheckResult("resnet50", FP32, CPU, GRADIENTS, 1.0, 3e-2, 1e-3, stages, "tensors")
    assert unmeasured.limit == 1e-3 and not unmeasured.passed


def test_floor_is_measured_in_fp32_train_checks_only() -> None:
    fp32 = {r.check: r for r in run_checks("resnet18", CPU, FP32, (33, 47), 2, seed=3)}
    for check in (TRAIN_LOGITS, GRADIENTS, SGD):
        assert 0.0 < fp32[check].floor < fp32[check].tol, check  # resnet18 is well conditioned
    assert fp32[EVAL].floor == 0.0
    fp64 = run_checks("resnet18", CPU, FP64, (33, 47), 2, seed=3, checks=[TRAIN_LOGITS])
    assert all(r.floor == 0.0 for r in fp64)


@pytest.mark.parametrize("nesterov", [False, True])
def test_optax_chain_matches_torch_sgd_step_by_step(nesterov: bool) -> None:
    """Five steps on random tensors: momentum buffer (first step included), Nesterov and coupled weight
    decay agree."""
    rng = np.random.default_rng(6)
    params = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(5)]
    lr, momentum, wd = 0.1, 0.9, 0.01
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    opt = torch.optim.SGD(tensors.values(), lr=lr, momentum=momentum, weight_decay=wd, nesterov=nesterov)
    tx = torch_sgd(lr, momentum, wd, nesterov=nesterov)
    with applied(MODES[FP64], CPU):
        p = {k: np.asarray(v) for k, v in params.items()}
        state = tx.init(p)
        for g in grads:
            for k, t in tensors.items():
                t.grad = torch.tensor(g[k])
            opt.step()
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
            for k, t in tensors.items():
                np.testing.assert_allclose(np.asarray(p[k]), t.detach().numpy(), rtol=1e-13, atol=1e-13)
    # The check is sharp: without the weight decay the parameters end elsewhere.
    assert not np.allclose(np.asarray(p["w"]), params["w"] - lr * sum(g["w"] for g in grads), atol=1e-3)


def test_precisions_per_device_and_bad_names() -> None:
    assert precisions_for(CPU, "all") == (FP64, FP32)
    assert precisions_for(GPU, "all") == (FP32, TF32, BF16)
    assert precisions_for(CPU, BF16) == (BF16,)
    with pytest.raises(ValueError, match="precision must be one of"):
        precisions_for(CPU, "fp16")
    with pytest.raises(ValueError, match="device must be one of"):
        precisions_for("tpu", FP32)
    assert "CPU has no TF32" in MODES[TF32].describe(CPU)


def test_applied_sets_and_restores_torch_switches() -> None:
    before = torch_tf32_summary()
    with applied(MODES[FP32], CPU):
        strict = torch_tf32_summary()
    with applied(MODES[TF32], CPU):
        default = torch_tf32_summary()
    assert torch_tf32_summary() == before
    conv_tf32 = ("cudnn conv fp32_precision=tf32", "cudnn allow_tf32=True")  # new API, legacy API
    assert not any(s in strict for s in conv_tf32)
    assert any(s in default for s in conv_tf32)


def _cli(args: list[str]) -> list[str]:
    return ["check", "--arch", "resnet18", "--device", "cpu", "--size", "33", "47", "--batch", "2", *args]


def test_cli_passes_with_json(tmp_path, capsys) -> None:
    out = tmp_path / "report.json"
    code = main(_cli(["--precision", "fp32", "--checks", "eval logits", "--json", str(out)]))
    printed = capsys.readouterr().out
    assert code == 0
    assert "PASS" in printed and "FAIL" not in printed and "fp32 on cpu" in printed
    report = json.loads(out.read_text())
    assert report["passed"] is True
    [run] = report["runs"]
    assert run["arch"] == "resnet18" and [r["check"] for r in run["results"]] == [EVAL]
    assert set(report["versions"]) >= {"torch", "jax", "flax", "optax"}
    assert not list(tmp_path.glob(".*.tmp*"))


@pytest.mark.parametrize("place", ["under_a_file", "full_device"])
def test_cli_json_into_an_unwritable_place_exits_2_before_any_check(tmp_path, capsys, place) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "full.json").symlink_to("/dev/full")  # writes fail with ENOSPC
    out = tmp_path / "file" / "report.json" if place == "under_a_file" else tmp_path / "full.json"
    code = main(_cli(["--precision", "fp32", "--checks", "eval logits", "--json", str(out)]))
    printed, err = capsys.readouterr()
    assert code == 2 and f"cannot write --json {out}" in err and "Traceback" not in err
    assert "PASS" not in printed and "FAIL" not in printed  # it stopped before running a check


def test_cli_fails_and_names_stage(monkeypatch, capsys) -> None:
    """A converter that corrupts one conv4_x kernel: exit code 1 and conv4_x in the table."""
    real = linen.torch_to_flax

    def corrupting(obj, target=None, **kwargs):
        variables = real(obj, target=target, **kwargs)
        kernel = variables["params"]["conv4_x"]["1"]["residual_function"]["0"]["kernel"]
        variables["params"]["conv4_x"]["1"]["residual_function"]["0"]["kernel"] = kernel.at[1, 1, 0, 0].add(0.5)
        return variables

    monkeypatch.setattr(linen, "torch_to_flax", corrupting)
    code = main(_cli(["--precision", "fp32", "--checks", "eval logits"]))
    printed = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in printed and "conv4_x" in printed


def test_cli_rejects_unusable_requests(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(_cli(["--checks", "logits"]))
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["check", "--size", "0", "5"])
    if not torch.cuda.is_available():
        assert main(["check", "--device", "gpu"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
