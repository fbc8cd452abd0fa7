"""The seed tutorial's ResNet in PyTorch: ResNet, BasicBlock, BottleNeck and the builders.

State-dict keys are exactly the seed's (``conv1.0.weight``,
``conv2_x.0.residual_function.0.weight``, ``conv2_x.0.shortcut.1.running_var``, ``fc.bias``),
so checkpoints written by the seed's own code load with ``strict=True``. ReLU and the residual
sum work in place, as torchvision's do (the seed's are out of place), so both run the same
operations at the same speed (docs/performance.md has the cost of out of place).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from resnet_arch import DEPTHS, HEAD, IN_CHANNELS, STAGES, STEM, STEM_WIDTH, check_options


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, symmetric padding 1, no bias."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Projection (1x1 conv + BN) when the shape changes, else the identity (an empty Sequential)."""
    if stride != 1 or in_channels != out_channels:
        return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
    return nn.Sequential()


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.residual_function = nn.Sequential(
            conv3x3(in_channels, out_channels, stride),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            conv3x3(out_channels, out_channels),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = _shortcut(in_channels, out_channels * self.expansion, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual_function(x)
        out += self.shortcut(x)
        return self.relu(out)


class BottleNeck(nn.Module):
    """1x1 -> 3x3 -> 1x1 convolutions (ResNet-50/101/152).

    The stride sits on the 3x3 convolution, as in the seed and torchvision ("ResNet v1.5").
    """

    expansion = 4

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.residual_function = nn.Sequential(
            conv1x1(in_channels, out_channels),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            conv3x3(out_channels, out_channels, stride),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            conv1x1(out_channels, out_channels * self.expansion),
            nn.BatchNorm2d(out_channels * self.expansion),
        )
        self.shortcut = _shortcut(in_channels, out_channels * self.expansion, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual_function(x)
        out += self.shortcut(x)
        return self.relu(out)


BLOCKS: dict[str, type[BasicBlock] | type[BottleNeck]] = {
    "BasicBlock": BasicBlock,
    "BottleNeck": BottleNeck,
}


class ResNet(nn.Module):
    """The seed's ResNet: stem ``conv1``, stages ``conv2_x``..``conv5_x``, ``avg_pool``, ``fc``.

    ``small_stem`` swaps the 7x7/2 convolution and max-pool for one 3x3/1 convolution, for
    32x32 images; ``zero_init_residual`` starts each block's last BatchNorm at zero scale.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[BottleNeck],
        num_block: list[int] | tuple[int, ...],
        *,
        num_classes: int = 10,
        init_weights: bool = True,
        zero_init_residual: bool = False,
        small_stem: bool = False,
    ) -> None:
        super().__init__()
        check_options(block, num_block, num_classes, BLOCKS)
        self.in_channels = STEM_WIDTH
        if small_stem:
            self.conv1 = nn.Sequential(
                nn.Conv2d(IN_CHANNELS, STEM_WIDTH, kernel_size=3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(STEM_WIDTH),
                nn.ReLU(inplace=True),
            )
        else:
            self.conv1 = nn.Sequential(
                nn.Conv2d(IN_CHANNELS, STEM_WIDTH, kernel_size=7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(STEM_WIDTH),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        for (name, width, stride), blocks in zip(STAGES, num_block, strict=True):
            setattr(self, name, self._make_layer(block, width, blocks, stride))
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        if init_weights:
            self._initialize_weights()
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, BottleNeck)):
                    nn.init.zeros_(cast(nn.BatchNorm2d, m.residual_function[-1]).weight)

    def _make_layer(
        self, block: type[BasicBlock] | type[BottleNeck], out_channels: int, num_blocks: int, stride: int
    ) -> nn.Sequential:
        """One stage: the first block takes the stride (and the projection), the rest stride 1."""
        strides = [stride] + [1] * (num_blocks - 1)
        layers = []
        for stride in strides:
            layers.append(block(self.in_channels, out_channels, stride))
            self.in_channels = out_channels * block.expansion
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW images -> the last stage's NCHW feature map."""
        x = self.conv1(x)
        for name, _, _ in STAGES:
            x = getattr(self, name)(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map -> logits."""
        x = self.avg_pool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW images (N, 3, H, W) -> logits (N, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every stage's output by name (``conv1``, ``conv2_x``.. ``conv5_x``, ``fc``), in order."""
        outputs = {STEM: self.conv1(x)}
        x = outputs[STEM]
        for name, _, _ in STAGES:
            x = outputs[name] = getattr(self, name)(x)
        outputs[HEAD] = self.forward_head(x)
        return outputs

    def _initialize_weights(self) -> None:
        """The seed's initialization: kaiming normal (fan_out) convs, BN (1, 0), fc normal(0, 0.01)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # every conv is bias-free
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)


def build(arch: str, **options: Any) -> ResNet:
    """A ResNet by depth name ("resnet18" .. "resnet152"), with ResNet's keyword options."""
    if arch not in DEPTHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(DEPTHS)}")
    block_name, num_block = DEPTHS[arch]
    return ResNet(BLOCKS[block_name], list(num_block), **options)


def resnet18(**options: Any) -> ResNet:
    """ResNet-18: BasicBlock, [2, 2, 2, 2]."""
    return build("resnet18", **options)


def resnet34(**options: Any) -> ResNet:
    """ResNet-34: BasicBlock, [3, 4, 6, 3]."""
    return build("resnet34", **options)


def resnet50(**options: Any) -> ResNet:
    """ResNet-50: BottleNeck, [3, 4, 6, 3] (the seed's ``resnet50()``)."""
    return build("resnet50", **options)


def resnet101(**options: Any) -> ResNet:
    """ResNet-101: BottleNeck, [3, 4, 23, 3]."""
    return build("resnet101", **options)


def resnet152(**options: Any) -> ResNet:
    """ResNet-152: BottleNeck, [3, 8, 36, 3]."""
    return build("resnet152", **options)
