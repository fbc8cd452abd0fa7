"""The checks a checkpoint passes where it enters, each naming every offending key at once.

Names and shapes against an architecture, plain tensor storage, weight dtypes, and values (NaN/inf
weights, BatchNorm counters). Keys are seed keys; each check takes a ``name`` function that puts them
in the caller's terms (a torch layout's names, or Flax paths).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from resnet_arch import BN_COUNTER, DTYPES
from resnet_flax.ops import COUNTER_DTYPE

from .arch import ArchSpec, infer_arch
from .arrays import one_torch_thread

Shapes = Mapping[str, tuple[int, ...]]

ERROR, WARN = "error", "warn"
# What NaN/inf weights and a negative or fractional BatchNorm counter get: an error or a warning.
BAD_VALUES = (ERROR, WARN)
# The argument that converts them anyway, as the messages name it (the command line's --bad-values warn).
BAD_VALUES_HINT = f"bad_values={WARN!r}"
_COUNTER_RANGE = (int(np.iinfo(COUNTER_DTYPE).min), int(np.iinfo(COUNTER_DTYPE).max))


class ConversionError(ValueError):
    """A checkpoint does not fit the model: every missing, unexpected or misshapen key is named."""


def builder_options(spec: ArchSpec, options: Mapping[str, Any]) -> dict[str, Any]:
    """A model builder's options without those the weights fix (``num_classes``, ``small_stem``).

    The same value as the weights' is taken; another raises ConversionError naming both.
    """
    fixed = spec.model_kwargs()
    conflicts = [
        f"{k}={options[k]!r} where the weights have {v!r}" for k, v in fixed.items() if k in options and options[k] != v
    ]
    if conflicts:
        raise ConversionError(
            f"{'; '.join(conflicts)}: the architecture comes from the weights (leave {', '.join(fixed)} out)"
        )
    return {k: v for k, v in options.items() if k not in fixed}


def check_bad_values(bad_values: str) -> None:
    """ValueError naming the choices when ``bad_values`` is not one of BAD_VALUES."""
    if bad_values not in BAD_VALUES:
        raise ValueError(f"bad_values must be one of {', '.join(BAD_VALUES)}, got {bad_values!r}")


def raise_listed(title: str, sections: Mapping[str, list[str]], hint: str = "") -> None:
    """Raise ConversionError with one line per non-empty section, naming every item."""
    lines = [f"  {head} ({len(items)}): " + ", ".join(items) for head, items in sections.items() if items]
    if lines:
        raise ConversionError("\n".join([title, *lines, *([hint] if hint else [])]))


def infer(shapes: Shapes) -> ArchSpec:
    """The architecture seed keys and torch shapes describe; ConversionError when they describe none."""
    try:
        return infer_arch(shapes)
    except ValueError as e:
        raise ConversionError(str(e)) from None


def _same_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape


def check_names_and_shapes(
    got: Shapes,
    expected: Shapes,
    what: str,
    name: Callable[[str, tuple[int, ...]], str],
    shown: Callable[[str, tuple[int, ...]], tuple[int, ...]] = _same_shape,
) -> None:
    """Raise ConversionError naming every missing, unexpected and misshapen key.

    Keys and shapes are compared in torch terms; ``name`` and ``shown`` put them in the caller's terms.
    """
    missing = [name(k, s) for k, s in expected.items() if k not in got]
    unexpected = [name(k, s) for k, s in got.items() if k not in expected]
    misshapen = [
        f"{name(k, s)}: got {shown(k, tuple(got[k]))}, expected {shown(k, s)}"
        for k, s in expected.items()
        if k in got and tuple(got[k]) != s
    ]
    raise_listed(
        f"checkpoint does not fit {what}:",
        {"missing": missing, "unexpected": unexpected, "shape mismatch": misshapen},
    )


def check_plain_data(tensors: Mapping[str, torch.Tensor], name: Callable[[str], str]) -> None:
    """ConversionError naming every tensor without plain data: meta, sparse or quantized."""
    unreadable = [name(k) for k, t in tensors.items() if t.is_meta or t.layout != torch.strided or t.is_quantized]
    raise_listed("checkpoint holds tensors without plain data (meta, sparse or quantized):", {"tensor": unreadable})


def check_dtypes(dtypes: Mapping[str, str], name: Callable[[str], str]) -> None:
    """{seed key: dtype name} -> ConversionError naming every tensor of a dtype no weight has."""
    allowed = list(DTYPES.values())
    bad = [
        f"{name(k)}: {dtype}"
        for k, dtype in dtypes.items()
        if dtype not in allowed and not (k.endswith(BN_COUNTER) and dtype.startswith(("int", "uint")))
    ]
    raise_listed(
        "checkpoint holds tensors of a dtype a weight cannot have (no complex, float8, integer or quantized "
        f"weights; expected {', '.join(allowed)}):",
        {"dtype": bad},
    )


def check_values(
    tensors: Mapping[str, torch.Tensor], name: Callable[[str], str], bad_values: str, stacklevel: int
) -> dict[str, int]:
    """Refuse (or warn about) NaN/inf weights and odd BatchNorm counters; returns {seed key: counter}.

    A counter that is NaN or outside int32 (Flax keeps it as int32) is always an error; a negative or
    fractional one, like a NaN/inf weight, is an error or a warning as ``bad_values`` says.
    """
    nonfinite, odd, impossible, counters = [], [], [], {}
    with one_torch_thread():  # a reduction per tensor, memory-bound like the copies
        for key, t in tensors.items():
            if key.endswith(BN_COUNTER):
                value = float(t) if t.is_floating_point() else int(t)
                if not math.isfinite(value) or not _COUNTER_RANGE[0] <= value <= _COUNTER_RANGE[1]:
                    impossible.append(f"{name(key)} = {value}")
                    continue
                if value < 0 or value != int(value):
                    odd.append(f"{name(key)} = {value}")
                counters[key] = int(value)
            elif not bool(torch.isfinite(t.sum())):  # one pass; a sum that overflows is checked element-wise
                nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                if nan or inf:
                    nonfinite.append(f"{name(key)} ({nan} NaN, {inf} inf)")
    raise_listed(
        "BatchNorm counters (num_batches_tracked) that cannot be stored (NaN, or outside int32):",
        {"counter": impossible},
    )
    found = {"NaN/inf": nonfinite, "negative or fractional counter": odd}
    if bad_values == ERROR:
        raise_listed("checkpoint holds values no trained network has:", found, f"  ({BAD_VALUES_HINT} converts them)")
    elif nonfinite or odd:
        lines = "; ".join(f"{head}: {', '.join(items)}" for head, items in found.items() if items)
        warnings.warn(f"converting values no trained network has: {lines}", stacklevel=stacklevel + 1)
    return counters
