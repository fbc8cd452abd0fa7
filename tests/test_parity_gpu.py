"""Parity on a CUDA GPU: ResNet-50, batch 8 at 224 (and an odd size), in every GPU precision mode.

CPU twins: tests/test_parity.py runs the same checks in fp32 (strict) on the CPU, and the TF32-default
and bf16 code paths on the CPU (test_gpu_modes_on_cpu); tests/test_fused.py runs the fused model's.
"""

from __future__ import annotations

import pytest
import torch

from parity.checks.precision import BF16, CHECKS, FP32, GPU, MODES, TF32, applied, torch_tf32_summary
from parity.checks.run import run_checks

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    "precision, size", [(FP32, (224, 224)), (TF32, (224, 224)), (BF16, (224, 224)), (FP32, (97, 131))]
)
def test_resnet50_on_gpu(precision: str, size: tuple[int, int]) -> None:
    results = run_checks("resnet50", GPU, precision, size, 8, seed=0)
    assert [r.check for r in results] == [c for c in CHECKS if c in MODES[precision].tolerances]
    for r in results:
        assert r.device == GPU
        assert r.passed, f"{r.precision} {r.check}: rel {r.rel:.3e} > {r.tol:.0e}, first diverging {r.first_diverging}"


@pytest.mark.parametrize("precision", [FP32, BF16])
def test_fused_resnet50_on_gpu(precision: str) -> None:
    """The fused-BatchNorm model training uses (resnet_flax.fused) against torch, every check."""
    results = run_checks("resnet50", GPU, precision, (224, 224), 8, seed=0, fused_bn=True)
    assert [r.check for r in results] == [c for c in CHECKS if c in MODES[precision].tolerances]
    for r in results:
        assert r.passed, (
            f"fused {r.precision} {r.check}: rel {r.rel:.3e} > {r.tol:.0e}, first diverging {r.first_diverging}"
        )


def test_strict_mode_turns_tf32_off_and_restores() -> None:
    before = torch_tf32_summary()
    with applied(MODES[FP32], GPU):
        strict = torch_tf32_summary()
        a, b = torch.randn(256, 256, device="cuda"), torch.randn(256, 256, device="cuda")
        exact = (a.double() @ b.double()).float()
        assert torch.allclose(a @ b, exact, rtol=1e-5, atol=1e-4)  # TF32 would miss by ~1e-3
    assert not any(s in strict for s in ("fp32_precision=tf32", "allow_tf32=True"))
    assert torch_tf32_summary() == before
