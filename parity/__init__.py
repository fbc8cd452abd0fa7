"""Weights between resnet_torch and resnet_flax (linen and NNX), and the checks that prove both compute the same.

Two parts: ``parity.conversion`` (name rules, architecture from shapes, checked weights, arrays, files,
hub directories) and ``parity.checks`` (eval, train, gradients and SGD comparisons in a precision mode,
and their report), with the ``resnet-parity`` command line (``parity.cli``) on top of both.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .conversion.arch import ArchSpec, infer_arch
    from .conversion.convert import ConversionError, arch_of, flax_to_torch, torch_to_flax
    from .conversion.files import CheckpointError, read_checkpoint, write_checkpoint
    from .conversion.load import load_checkpoint
    from .conversion.nnx import linen_to_nnx, nnx_to_linen, nnx_to_torch, torch_to_nnx

# Every public name is imported on first use: a submodule that needs no framework (the trainer's
# parity.conversion.atomic, parity.checks.optim) imports neither torch nor flax.nnx through this package.
_HOMES = {
    "ArchSpec": "arch",
    "infer_arch": "arch",
    "ConversionError": "convert",
    "arch_of": "convert",
    "flax_to_torch": "convert",
    "torch_to_flax": "convert",
    "CheckpointError": "files",
    "read_checkpoint": "files",
    "write_checkpoint": "files",
    "load_checkpoint": "load",
    "linen_to_nnx": "nnx",
    "nnx_to_linen": "nnx",
    "nnx_to_torch": "nnx",
    "torch_to_nnx": "nnx",
}

__all__ = [
    "ArchSpec",
    "CheckpointError",
    "ConversionError",
    "arch_of",
    "flax_to_torch",
    "infer_arch",
    "linen_to_nnx",
    "load_checkpoint",
    "nnx_to_linen",
    "nnx_to_torch",
    "read_checkpoint",
    "torch_to_flax",
    "torch_to_nnx",
    "write_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.conversion.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
