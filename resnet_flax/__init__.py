"""A Flax linen mirror of resnet_torch: same classes, builders and module tree, NHWC input."""

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
