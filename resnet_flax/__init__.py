"""A Flax linen mirror of resnet_torch: same classes, builders (every depth and variant) and module tree, NHWC input.

``resnet_flax.nnx`` is the same model in Flax NNX, with the same variable paths.
"""

import importlib
from typing import Any

from resnet_arch import ARCH_NAMES, DEPTHS, VARIANTS

from .model import (
    BasicBlock,
    BottleNeck,
    ResNet,
    SqueezeExcite,
    build,
    resnet18,
    resnet18d,
    resnet34,
    resnet34d,
    resnet50,
    resnet50d,
    resnet101,
    resnet101d,
    resnet152,
    resnet152d,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    seresnet50,
    seresnet101,
    seresnet152,
    wide_resnet50_2,
    wide_resnet101_2,
)

__all__ = [
    "ARCH_NAMES",
    "DEPTHS",
    "VARIANTS",
    "BasicBlock",
    "BottleNeck",
    "ResNet",
    "SqueezeExcite",
    "build",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnet18d",
    "resnet34d",
    "resnet50d",
    "resnet101d",
    "resnet152d",
    "seresnet50",
    "seresnet101",
    "seresnet152",
]


def __getattr__(name: str) -> Any:
    """``resnet_flax.nnx`` on first use: it imports flax.nnx (about a second), which linen users never need."""
    if name == "nnx":
        return importlib.import_module(f"{__name__}.nnx")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
