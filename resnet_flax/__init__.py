"""A Flax linen mirror of resnet_torch: same classes, builders and module tree, NHWC input.

``resnet_flax.nnx`` is the same model in Flax NNX, with the same variable paths.
"""

import importlib
from typing import Any

from resnet_arch import DEPTHS

from .model import BasicBlock, BottleNeck, ResNet, build, resnet18, resnet34, resnet50, resnet101, resnet152

__all__ = [
    "DEPTHS",
    "BasicBlock",
    "BottleNeck",
    "ResNet",
    "build",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
]


def __getattr__(name: str) -> Any:
    """``resnet_flax.nnx`` on first use: it imports flax.nnx (about a second), which linen users never need."""
    if name == "nnx":
        return importlib.import_module(f"{__name__}.nnx")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
