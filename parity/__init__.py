"""Weights between resnet_torch and resnet_flax (linen and NNX), and the checks that prove both compute the same."""

import importlib
from typing import Any

from .arch import ArchSpec, infer_arch
from .convert import ConversionError, arch_of, flax_to_torch, torch_to_flax
from .files import CheckpointError, read_checkpoint, write_checkpoint
from .load import load_checkpoint

# parity.nnx's converters, imported on first use: flax.nnx costs about a second that linen users never need.
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
        return getattr(importlib.import_module(f"{__name__}.nnx"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
