"""Precision modes of a parity run: what each framework computes in, and the tolerances that apply.

``MODES`` is the tolerance table; docs/design.md ("How close is close enough") gives the reasons
for it. Both frameworks are set explicitly for every mode and restored afterwards, so a run always
says which arithmetic it compared (docs/design.md, "float32 on Ampere/Hopper GPUs").
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import torch

FP64, FP32, TF32, BF16 = "fp64", "fp32", "tf32", "bf16"
PRECISIONS = (FP64, FP32, TF32, BF16)
CPU, GPU = "cpu", "gpu"
DEVICES = (CPU, GPU)
# What --precision all means on each device: the columns of docs/design.md's tolerance table.
ALL_PRECISIONS = {CPU: (FP64, FP32), GPU: (FP32, TF32, BF16)}

EVAL, TRAIN_LOGITS, RUNNING_STATS, GRADIENTS, SGD = "eval logits", "train logits", "running stats", "gradients", "sgd"
CHECKS = (EVAL, TRAIN_LOGITS, RUNNING_STATS, GRADIENTS, SGD)

# torch >= 2.9 has per-backend TF32 switches (fp32_precision); earlier releases have only allow_tf32.
_PER_BACKEND_TF32 = hasattr(torch.backends.cuda.matmul, "fp32_precision")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mode:
    """One precision mode: dtypes and switches on both sides, its tolerances, and its SGD step count."""

    name: str  # the --precision name (fp64, fp32, tf32, bf16)
    torch_dtype: torch.dtype  # dtype of the torch model's parameters and inputs
    jax_dtype: Any  # resnet_flax compute dtype
    jax_param_dtype: Any  # resnet_flax parameter dtype (and the dtype of the JAX inputs)
    jax_precision: Any  # resnet_flax `precision` for every convolution and matrix product
    torch_conv_tf32: bool  # cuDNN convolutions may use TF32
    torch_matmul_tf32: bool  # cuBLAS matrix products may use TF32
    torch_autocast: torch.dtype | None  # torch.autocast dtype around the forward pass, if any
    x64: bool  # jax_enable_x64 for the run
    tolerances: dict[str, float]  # check -> relative-error tolerance; checks not listed are not run
    sgd_steps: int  # SGD steps of the sgd check
    summary: str  # what both frameworks compute in, as the run reports it

    def describe(self, device: str) -> str:
        """One line saying what both frameworks computed in."""
        note = " (CPU has no TF32: computes in fp32)" if device == CPU and self.name == TF32 else ""
        return f"{self.name} on {device}: {self.summary}{note}"


MODES: dict[str, Mode] = {
    FP64: Mode(
        name=FP64,
        torch_dtype=torch.float64,
        jax_dtype=jnp.float64,
        jax_param_dtype=jnp.float64,
        jax_precision=jax.lax.Precision.HIGHEST,
        torch_conv_tf32=False,
        torch_matmul_tf32=False,
        torch_autocast=None,
        x64=True,
        tolerances={EVAL: 1e-10, TRAIN_LOGITS: 1e-10, RUNNING_STATS: 1e-10, GRADIENTS: 1e-10, SGD: 1e-10},
        # Three steps: fp64 rounding is small enough that multi-step drift proves the semantics.
        sgd_steps=3,
        summary="float64 everywhere (torch .double(), jax_enable_x64 with dtype=param_dtype=float64)",
    ),
    FP32: Mode(
        name=FP32,
        torch_dtype=torch.float32,
        jax_dtype=jnp.float32,
        jax_param_dtype=jnp.float32,
        jax_precision=jax.lax.Precision.HIGHEST,
        torch_conv_tf32=False,
        torch_matmul_tf32=False,
        torch_autocast=None,
        x64=False,
        tolerances={EVAL: 1e-5, TRAIN_LOGITS: 2e-4, RUNNING_STATS: 2e-4, GRADIENTS: 1e-3, SGD: 1e-5},
        # One step: fp32 rounding through train-mode BatchNorm makes longer runs chaotic (docs/design.md).
        sgd_steps=1,
        summary="float32, TF32 off on both sides (torch convs and matmuls in IEEE fp32; JAX precision=HIGHEST)",
    ),
    TF32: Mode(
        name=TF32,
        torch_dtype=torch.float32,
        jax_dtype=jnp.float32,
        jax_param_dtype=jnp.float32,
        jax_precision=None,
        torch_conv_tf32=True,
        torch_matmul_tf32=False,
        torch_autocast=None,
        x64=False,
        tolerances={EVAL: 3e-3, TRAIN_LOGITS: 3e-2, RUNNING_STATS: 3e-2},
        sgd_steps=0,
        summary="float32 with each framework's GPU default (torch: TF32 cuDNN convs, fp32 matmuls; "
        "JAX precision=DEFAULT)",
    ),
    BF16: Mode(
        name=BF16,
        torch_dtype=torch.float32,
        jax_dtype=jnp.bfloat16,
        jax_param_dtype=jnp.float32,
        jax_precision=None,
        torch_conv_tf32=True,
        torch_matmul_tf32=False,
        torch_autocast=torch.bfloat16,
        x64=False,
        tolerances={EVAL: 3e-2},
        sgd_steps=0,
        summary="bf16 compute, float32 parameters (torch.autocast bfloat16; flax dtype=bfloat16)",
    ),
}


def precisions_for(device: str, precision: str) -> tuple[str, ...]:
    """The precision modes that ``--precision`` names on ``device`` ('all' expands per device)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if precision == "all":
        return ALL_PRECISIONS[device]
    if precision not in MODES:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} or all, got {precision!r}")
    return (precision,)


def _torch_tf32_state() -> tuple[Any, ...]:
    b = torch.backends
    if _PER_BACKEND_TF32:
        # cudnn.conv and cudnn.rnn live on the class that replaces torch.backends.cudnn at import,
        # and the module's own annotations, which mypy reads, do not declare them.
        return (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision)  # type: ignore[attr-defined]
    return (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)


def _set_torch_tf32_state(state: tuple[Any, ...]) -> None:
    b = torch.backends
    if _PER_BACKEND_TF32:
        # As in _torch_tf32_state: attributes of torch's replacement module class, undeclared for mypy.
        b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision = state  # type: ignore[attr-defined]
    else:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = state


def _tf32_setting(conv: bool, matmul: bool) -> tuple[Any, ...]:
    if _PER_BACKEND_TF32:
        # Only the per-backend switches are written: torch refuses reads that mix them with allow_tf32.
        conv_p = "tf32" if conv else "ieee"
        return ("tf32" if matmul else "ieee", conv_p, conv_p)
    return (matmul, conv)


def torch_tf32_summary() -> str:
    """torch's current TF32 switches, as the run reports them."""
    state = _torch_tf32_state()
    if _PER_BACKEND_TF32:
        return f"torch matmul fp32_precision={state[0]}, cudnn conv fp32_precision={state[1]}"
    return f"torch matmul allow_tf32={state[0]}, cudnn allow_tf32={state[1]}"


@contextlib.contextmanager
def applied(mode: Mode, device: str) -> Iterator[None]:
    """Set torch's TF32 switches, jax_enable_x64 and JAX's default device for ``mode``; restore after."""
    target = jax_device(device)
    saved = _torch_tf32_state()
    try:
        _set_torch_tf32_state(_tf32_setting(mode.torch_conv_tf32, mode.torch_matmul_tf32))
        with jax.enable_x64(mode.x64), jax.default_device(target):
            yield
    finally:
        _set_torch_tf32_state(saved)


def torch_device(device: str) -> torch.device:
    """The torch device of a parity run."""
    return torch.device("cuda" if device == GPU else "cpu")


def jax_device(device: str) -> jax.Device:
    """The JAX device of a parity run; a clear error when a GPU is asked for and either side lacks one."""
    if device == CPU:
        return jax.devices("cpu")[0]
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus or not torch.cuda.is_available():
        raise RuntimeError(
            f"--device gpu needs a CUDA GPU visible to both frameworks; torch sees "
            f"{torch.cuda.device_count()}, jax sees {len(gpus)}"
        )
    return gpus[0]
