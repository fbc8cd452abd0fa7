"""Weights between resnet_torch and resnet_flax (linen and NNX), and the checks that prove both compute the same.

Two parts: ``parity.conversion`` (name rules, architecture from shapes, checked weights, arrays, files,
hub directories) and ``parity.checks`` (eval, train, gradients and SGD comparisons in a precision mode,
and their report), with the ``resnet-parity`` command line (``parity.cli``) on top of both.
"""

import importlib
from typing import Any

from .conversion.arch import ArchSpec, infer_arch
from .conversion.convert import ConversionError, arch_of, flax_to_torch, torch_to_flax
from .conversion.files import CheckpointError, read_checkpoint, write_checkpoint
from .conversion.load import load_checkpoint

# parity.conversion.nnx's converters, imported on first use: flax.nnx costs about a second that linen users never need.
_NNX_NAMES = ("linen_to_nnx", "nnx_to_linen", "nnx_to_torch", "torch_to_nnx")

__all__ = [
    "ArchSpec",
    "CheckpointError",
    "ConversionError",
    "arch_of",
    "flax_to_torch",
    "infer_arch",
    "load_checkpoint",
    "read_checkpoint",
    "torch_to_flax",
    "write_checkpoint",
    *_NNX_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _NNX_NAMES:
        return getattr(importlib.import_module(f"{__name__}.conversion.nnx"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
