"""Comparing the two frameworks' numbers: relative errors, per-stage errors, and one check's result."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from resnet_arch import STAGE_OUTPUTS

# Flax NHWC (batch, height, width, channels) -> torch NCHW.
TO_NCHW = (0, 3, 1, 2)


# Two computations that each miss the float64 answer by e can differ by up to 2e: a mirror is held
# to that where the problem amplifies rounding beyond the tolerance, not to a bound no
# implementation could meet (torch fp32 against torch fp64 is the measure of e).
FLOOR_FACTOR = 2.0


@dataclasses.dataclass
class CheckResult:
    """One compared quantity: its errors, tolerance and, per stage, the errors behind a diagnosis."""

    arch: str
    precision: str
    device: str
    check: str
    max_abs: float
    rel: float
    tol: float
    stage_errors: dict[str, float]  # stage -> relative error, in the order the diagnosis reads them
    stage_basis: str  # what stage_errors measure, e.g. "forward outputs (train mode)"
    # torch's own relative error in this precision against torch in float64 on the same input: how
    # much rounding the problem amplifies. 0.0 where not measured (float64 runs, eval checks).
    floor: float = 0.0

    @property
    def limit(self) -> float:
        """The bound rel is held to (``limit``)."""
        return limit(self.tol, self.floor)

    @property
    def passed(self) -> bool:
        """Within the limit (a NaN error never passes)."""
        return bool(self.rel <= self.limit)

    @property
    def first_diverging(self) -> str | None:
        """The first stage whose error exceeds the tolerance, if this check failed."""
        if self.passed:
            return None
        return next((s for s, e in self.stage_errors.items() if not e <= self.limit), None)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field, pass and diagnosis included."""
        extra = {"limit": self.limit, "passed": self.passed, "first_diverging": self.first_diverging}
        return {**dataclasses.asdict(self), **extra}


def limit(tol: float, floor: float) -> float:
    """The bound a relative error is held to: the tolerance, or FLOOR_FACTOR x the floor where that is larger."""
    return max(tol, FLOOR_FACTOR * floor)


def errors(a: Iterable[np.ndarray], b: Iterable[np.ndarray]) -> tuple[float, float]:
    """(max abs error, ||a - b|| / ||b||) over all pairs of arrays together, in float64."""
    sq_diff = sq_ref = 0.0
    max_abs = 0.0
    for x, y in zip(a, b, strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.shape != y.shape:
            raise ValueError(f"cannot compare shapes {x.shape} and {y.shape}")
        d = x - y
        sq_diff += float(np.sum(d * d))
        sq_ref += float(np.sum(y * y))
        max_abs = max(max_abs, float(np.max(np.abs(d), initial=0.0)))
    rel = np.sqrt(sq_diff) / np.sqrt(sq_ref) if sq_ref > 0 else (0.0 if sq_diff == 0 else np.inf)
    return max_abs, float(rel)


def numpy_of_torch(t: torch.Tensor) -> np.ndarray:
    """A torch tensor as a float64 numpy array on the CPU."""
    return t.detach().to("cpu", torch.float64).numpy()


def numpy_of_jax(x: jax.Array, nchw: bool = False) -> np.ndarray:
    """A JAX array as a float64 numpy array, 4-D ones turned NCHW when asked."""
    a = np.asarray(jnp.asarray(x, jnp.float32) if x.dtype == jnp.bfloat16 else x, np.float64)
    return a.transpose(TO_NCHW) if nchw and a.ndim == 4 else a


def stage_of(key: str) -> str:
    """The stage a state-dict key belongs to: its first component (conv1, conv2_x, ..., fc)."""
    return key.split(".", 1)[0]


def stage_errors(torch_stages: Mapping[str, torch.Tensor], flax_stages: Mapping[str, jax.Array]) -> dict[str, float]:
    """Relative error of every stage output (conv1 .. fc), in forward order."""
    return {
        s: errors([numpy_of_jax(flax_stages[s], nchw=True)], [numpy_of_torch(torch_stages[s])])[1]
        for s in STAGE_OUTPUTS
    }


def grouped_errors(
    got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], order: Iterable[str]
) -> dict[str, float]:
    """Relative error of the tensors of each stage, stages in the given order."""
    out = {}
    for stage in order:
        keys = [k for k in ref if stage_of(k) == stage]
        out[stage] = errors([got[k] for k in keys], [ref[k] for k in keys])[1]
    return out
