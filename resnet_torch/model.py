"""The seed tutorial's ResNet in PyTorch: ResNet, BasicBlock, BottleNeck and the builders.

The family's options (``groups``/``width_per_group`` for ResNeXt and Wide ResNet, ``stem="deep"`` and
``avg_down`` for ResNet-D, ``se`` for SE-ResNet) follow torchvision and timm; the modules they add have
seed-style keys (``conv1.3``, ``shortcut.1``, ``se.fc1``).

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

from resnet_arch import (
    AVG_DOWN_KERNEL,
    BASE_WIDTH,
    DEEP_STEM,
    DEEP_STEM_CONVS,
    DEFAULT_STEM,
    HEAD,
    IN_CHANNELS,
    STAGES,
    STEM,
    STEM_WIDTH,
    bottleneck_width,
    check_block_options,
    check_options,
    resolve_arch,
    se_width,
    variant_builder,
)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 convolution, symmetric padding 1, no bias; ``groups`` splits the channels as nn.Conv2d does."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


def _shortcut(in_channels: int, out_channels: int, stride: int, avg_down: bool) -> nn.Sequential:
    """Projection (1x1 conv + BN) when the shape changes, else the identity (an empty Sequential).

    ``avg_down`` (ResNet-D) strides with a 2x2 average pool before a stride-1 projection, timm's
    ``downsample_avg``: ceil mode, padding not counted, no pool (the identity) at stride 1.
    """
    if stride == 1 and in_channels == out_channels:
        return nn.Sequential()
    if avg_down:
        pool: nn.Module = (
            nn.AvgPool2d(AVG_DOWN_KERNEL, stride, ceil_mode=True, count_include_pad=False)
            if stride != 1
            else nn.Identity()
        )
        return nn.Sequential(pool, conv1x1(in_channels, out_channels), nn.BatchNorm2d(out_channels))
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (timm's SEModule): the channels' spatial mean through ``fc1`` (1x1 conv with
    bias), ReLU, ``fc2`` (1x1 conv with bias) and a sigmoid scales each channel of the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        reduced = se_width(channels)
        self.fc1 = nn.Conv2d(channels, reduced, kernel_size=1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(reduced, channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * scale.sigmoid()


class _Block(nn.Module):
    """What both blocks share: ``residual_function``, the optional ``se`` after it, the shortcut and the sum."""

    expansion: int
    residual_function: nn.Sequential

    def _finish(self, in_channels: int, out_channels: int, stride: int, avg_down: bool, se: bool) -> None:
        """Register ``se`` (after residual_function, as timm orders it) and ``shortcut``."""
        self.se = SqueezeExcite(out_channels * self.expansion) if se else None
        self.shortcut = _shortcut(in_channels, out_channels * self.expansion, stride, avg_down)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual_function(x)
        if self.se is not None:
            out = self.se(out)
        out += self.shortcut(x)
        return self.relu(out)


class BasicBlock(_Block):
    """Two 3x3 convolutions (ResNet-18/34); no groups or widths other than torchvision's defaults."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        groups: int = 1,
        width_per_group: int = BASE_WIDTH,
        avg_down: bool = False,
        se: bool = False,
    ) -> None:
        super().__init__()
        check_block_options("BasicBlock", groups, width_per_group)
        self.residual_function = nn.Sequential(
            conv3x3(in_channels, out_channels, stride),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            conv3x3(out_channels, out_channels),
            nn.BatchNorm2d(out_channels),
        )
        self._finish(in_channels, out_channels, stride, avg_down, se)


class BottleNeck(_Block):
    """1x1 -> 3x3 -> 1x1 convolutions (ResNet-50/101/152).

    The stride sits on the 3x3 convolution, as in the seed and torchvision ("ResNet v1.5"); so do
    ``groups`` (ResNeXt). The inner width is torchvision's ``bottleneck_width`` (Wide ResNet, ResNeXt).
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        groups: int = 1,
        width_per_group: int = BASE_WIDTH,
        avg_down: bool = False,
        se: bool = False,
    ) -> None:
        super().__init__()
        width = bottleneck_width(out_channels, groups, width_per_group)
        self.residual_function = nn.Sequential(
            conv1x1(in_channels, width),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            conv3x3(width, width, stride, groups),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            conv1x1(width, out_channels * self.expansion),
            nn.BatchNorm2d(out_channels * self.expansion),
        )
        self._finish(in_channels, out_channels, stride, avg_down, se)


BLOCKS: dict[str, type[BasicBlock] | type[BottleNeck]] = {
    "BasicBlock": BasicBlock,
    "BottleNeck": BottleNeck,
}


class ResNet(nn.Module):
    """The seed's ResNet: stem ``conv1``, stages ``conv2_x``..``conv5_x``, ``avg_pool``, ``fc``.

    ``small_stem`` swaps the 7x7/2 convolution and max-pool for one 3x3/1 convolution, for
    32x32 images; ``zero_init_residual`` starts each block's last BatchNorm at zero scale.
    ``groups``/``width_per_group`` shape the bottleneck's 3x3 convolution (ResNeXt, Wide ResNet);
    ``stem="deep"`` is three 3x3 convolutions before the max-pool and ``avg_down`` an average-pool
    shortcut (ResNet-D); ``se`` adds squeeze-and-excitation to every block (SE-ResNet).
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
        groups: int = 1,
        width_per_group: int = BASE_WIDTH,
        stem: str = DEFAULT_STEM,
        avg_down: bool = False,
        se: bool = False,
    ) -> None:
        super().__init__()
        family = dict(groups=groups, width_per_group=width_per_group, avg_down=avg_down, se=se)
        check_options(block, num_block, num_classes, BLOCKS, stem=stem, small_stem=small_stem, **family)
        self.in_channels = STEM_WIDTH
        if stem == DEEP_STEM:
            layers: list[nn.Module] = []
            for in_channels, out_channels, stride in DEEP_STEM_CONVS:
                layers += [
                    nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                ]
            self.conv1 = nn.Sequential(*layers, nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        elif small_stem:
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
            setattr(self, name, self._make_layer(block, width, blocks, stride, **family))
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        if init_weights:
            self._initialize_weights()
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, _Block):
                    nn.init.zeros_(cast(nn.BatchNorm2d, m.residual_function[-1]).weight)

    def _make_layer(
        self,
        block: type[BasicBlock] | type[BottleNeck],
        out_channels: int,
        num_blocks: int,
        stride: int,
        **block_options: Any,
    ) -> nn.Sequential:
        """One stage: the first block takes the stride (and the projection), the rest stride 1."""
        strides = [stride] + [1] * (num_blocks - 1)
        layers = []
        for stride in strides:
            layers.append(block(self.in_channels, out_channels, stride, **block_options))
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
        """The seed's initialization: kaiming normal (fan_out) convs with zero biases (SE's), BN (1, 0),
        fc normal(0, 0.01)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)


def build(arch: str, **options: Any) -> ResNet:
    """A ResNet by builder name (``ARCH_NAMES``: a depth or a variant), with ResNet's keyword options."""
    block_name, num_block, options = resolve_arch(arch, options)
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


resnext50_32x4d = variant_builder(build, "resnext50_32x4d")
resnext101_32x8d = variant_builder(build, "resnext101_32x8d")
resnext101_64x4d = variant_builder(build, "resnext101_64x4d")
wide_resnet50_2 = variant_builder(build, "wide_resnet50_2")
wide_resnet101_2 = variant_builder(build, "wide_resnet101_2")
resnet18d = variant_builder(build, "resnet18d")
resnet34d = variant_builder(build, "resnet34d")
resnet50d = variant_builder(build, "resnet50d")
resnet101d = variant_builder(build, "resnet101d")
resnet152d = variant_builder(build, "resnet152d")
seresnet50 = variant_builder(build, "seresnet50")
seresnet101 = variant_builder(build, "seresnet101")
seresnet152 = variant_builder(build, "seresnet152")
