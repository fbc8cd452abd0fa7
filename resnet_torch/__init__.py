"""The seed tutorial's PyTorch ResNet, at every depth, with the seed's state-dict keys."""

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
