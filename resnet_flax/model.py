"""The seed's ResNet as a Flax linen mirror: same classes, builders and module tree as resnet_torch.

Input is NHWC (N, H, W, 3). Parameter paths mirror the torch state-dict keys one to one
(``conv2_x/0/residual_function/0/kernel`` is ``conv2_x.0.residual_function.0.weight``), so the
converter in ``parity`` is a rule over names. The family's options (ResNeXt, Wide ResNet, ResNet-D,
SE-ResNet) are torch's, with the same module tree.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

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

from .layers import BatchNorm2d, Conv2d, Linear, Sequential
from .levers import check_stem_levers, max_pool2d_argmax_grad
from .ops import (
    Dtype,
    Initializer,
    avg_pool2d,
    check_input,
    excite,
    identity,
    kaiming_normal_fan_out,
    max_pool2d,
    relu,
    seed_linear_init,
    squeeze,
    torch_default_bias_init,
    torch_default_weight_init,
    zero_bias_init,
)

Array = jax.Array
# Initial weights draw millions of normals once: XLA compiles "rbg" bits faster than threefry on
# CPU (docs/performance.md), and initial weights need no more than the right distribution.
INIT_PRNG = "rbg"


def init_key(seed: int) -> Array:
    """The key a model's initial weights are drawn from, for training and benchmarks alike."""
    return jax.random.key(seed, impl=INIT_PRNG)


def _shortcut(
    in_channels: int, out_channels: int, stride: int, avg_down: bool, conv: Any, norm: Any
) -> Sequential | None:
    """Projection (1x1 conv + BN) when the shape changes, else None (the identity); with ``avg_down`` a
    ceil-mode average pool (the identity at stride 1) carries the stride before a stride-1 projection."""
    if stride == 1 and in_channels == out_channels:
        return None
    bn = functools.partial(norm, out_channels)
    if avg_down:
        pool = functools.partial(avg_pool2d, kernel_size=AVG_DOWN_KERNEL, stride=stride) if stride != 1 else identity
        return Sequential((pool, functools.partial(conv, in_channels, out_channels, 1), bn), name="shortcut")
    return Sequential((functools.partial(conv, in_channels, out_channels, 1, stride), bn), name="shortcut")


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (timm's SEModule): the channels' spatial mean through ``fc1`` (1x1 conv with
    bias), ReLU, ``fc2`` (1x1 conv with bias) and a sigmoid scales each channel of the input.

    ``bias_init`` maps a convolution's fan-in to its bias initializer.
    """

    channels: int
    _: dataclasses.KW_ONLY
    conv: Any = Conv2d
    bias_init: Callable[[int], Initializer] = zero_bias_init

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c, reduced = self.channels, se_width(self.channels)
        fc1 = self.conv(c, reduced, 1, use_bias=True, bias_init=self.bias_init(c), name="fc1")
        fc2 = self.conv(reduced, c, 1, use_bias=True, bias_init=self.bias_init(reduced), name="fc2")
        return excite(x, fc2(relu(fc1(squeeze(x)))))


class _Block(nn.Module):
    """What both blocks share: their options, ``residual_function`` (``_layers``), the optional ``se``,
    the shortcut and the sum."""

    in_channels: int
    out_channels: int
    stride: int = 1
    _: dataclasses.KW_ONLY
    groups: int = 1
    width_per_group: int = BASE_WIDTH
    avg_down: bool = False
    se: bool = False
    conv: Any = Conv2d
    norm: Any = BatchNorm2d
    last_norm_scale_init: Any = nn.initializers.ones
    se_bias_init: Callable[[int], Initializer] = zero_bias_init

    expansion: ClassVar[int]

    def _layers(self) -> tuple[Callable[..., Any], ...]:
        raise NotImplementedError

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out_channels = self.out_channels * self.expansion
        out = Sequential(self._layers(), name="residual_function")(x)
        if self.se:
            out = SqueezeExcite(out_channels, conv=self.conv, bias_init=self.se_bias_init, name="se")(out)
        shortcut = _shortcut(self.in_channels, out_channels, self.stride, self.avg_down, self.conv, self.norm)
        return relu(out + (x if shortcut is None else shortcut(x)))


class BasicBlock(_Block):
    """Two 3x3 convolutions (ResNet-18/34); no groups or widths other than torchvision's defaults."""

    expansion: ClassVar[int] = 1

    def __post_init__(self) -> None:
        check_block_options("BasicBlock", self.groups, self.width_per_group)
        super().__post_init__()

    def _layers(self) -> tuple[Callable[..., Any], ...]:
        c, n = self.conv, self.norm
        return (
            functools.partial(c, self.in_channels, self.out_channels, 3, self.stride, 1),
            functools.partial(n, self.out_channels),
            relu,
            functools.partial(c, self.out_channels, self.out_channels, 3, 1, 1),
            functools.partial(n, self.out_channels, scale_init=self.last_norm_scale_init),
        )


class BottleNeck(_Block):
    """1x1 -> 3x3 -> 1x1 convolutions (ResNet-50/101/152), the stride on the 3x3 ("ResNet v1.5"); so do
    ``groups`` (ResNeXt). The inner width is torchvision's ``bottleneck_width`` (Wide ResNet, ResNeXt)."""

    expansion: ClassVar[int] = 4

    def _layers(self) -> tuple[Callable[..., Any], ...]:
        c, n = self.conv, self.norm
        width = bottleneck_width(self.out_channels, self.groups, self.width_per_group)
        out_channels = self.out_channels * self.expansion
        return (
            functools.partial(c, self.in_channels, width, 1),
            functools.partial(n, width),
            relu,
            functools.partial(c, width, width, 3, self.stride, 1, groups=self.groups),
            functools.partial(n, width),
            relu,
            functools.partial(c, width, out_channels, 1),
            functools.partial(n, out_channels, scale_init=self.last_norm_scale_init),
        )


BLOCKS: dict[str, type[BasicBlock] | type[BottleNeck]] = {
    "BasicBlock": BasicBlock,
    "BottleNeck": BottleNeck,
}


def _block_options(model: ResNet) -> dict[str, Any]:
    """The family's options of a ResNet that every block takes (a function: linen wraps a module's methods)."""
    return dict(groups=model.groups, width_per_group=model.width_per_group, avg_down=model.avg_down, se=model.se)


class ResNet(nn.Module):
    """The seed's ResNet: stem ``conv1``, stages ``conv2_x``..``conv5_x``, average pool, ``fc``.

    ``dtype`` is the computation dtype (``jnp.bfloat16`` for mixed precision, ``jnp.float64`` with
    ``jax_enable_x64`` for exactness checks); ``param_dtype`` the parameters'; ``precision`` goes to
    every convolution and matrix product (``jax.lax.Precision.HIGHEST`` turns off TF32 on GPUs).
    """

    block: type[BasicBlock] | type[BottleNeck]
    num_block: Sequence[int]
    _: dataclasses.KW_ONLY
    num_classes: int = 10
    init_weights: bool = True
    zero_init_residual: bool = False
    small_stem: bool = False
    groups: int = 1
    width_per_group: int = BASE_WIDTH
    stem: str = DEFAULT_STEM
    avg_down: bool = False
    se: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    # Speed levers, the same function (resnet_flax.levers, docs/performance.md): 1x1 convolutions as matrix
    # products (None: the backend's default), the stem as a space-to-depth convolution, max-pool's
    # gradient through its argmax.
    matmul_1x1: bool | None = None
    space_to_depth_stem: bool = False
    max_pool_argmax_grad: bool = False
    # The layer kinds every convolution and BatchNorm is built from: fused.fused swaps in the fused
    # train-mode BatchNorm, fold.fold a biased convolution and an identity (same paths either way).
    # Linen modules are immutable, so these are options; NNX's fused and fold change the built layers.
    conv: Callable[..., nn.Module] = Conv2d
    norm: Callable[..., nn.Module] = BatchNorm2d

    def __post_init__(self) -> None:
        check_options(
            self.block,
            self.num_block,
            self.num_classes,
            BLOCKS,
            stem=self.stem,
            small_stem=self.small_stem,
            **_block_options(self),
        )
        check_stem_levers(
            stem=self.stem,
            small_stem=self.small_stem,
            space_to_depth_stem=self.space_to_depth_stem,
            max_pool_argmax_grad=self.max_pool_argmax_grad,
        )
        # A list (the seed writes [3, 4, 6, 3]) would make the module unhashable, so no static jit arg.
        object.__setattr__(self, "num_block", tuple(self.num_block))
        super().__post_init__()

    def _make_layer(
        self, in_channels: int, out_channels: int, num_blocks: int, stride: int, name: str, **block_kwargs: Any
    ) -> tuple[Sequential, int]:
        """One stage: the first block takes the stride (and the projection), the rest stride 1."""
        strides = [stride] + [1] * (num_blocks - 1)
        layers = []
        for stride in strides:
            layers.append(functools.partial(self.block, in_channels, out_channels, stride, **block_kwargs))
            in_channels = out_channels * self.block.expansion
        return Sequential(tuple(layers), name=name), in_channels

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False, return_stages: bool = False) -> Array | dict[str, Array]:
        """NHWC images (N, H, W, 3) -> logits (N, num_classes), or every stage's output by name."""
        check_input(x)
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv_init = kaiming_normal_fan_out if self.init_weights else torch_default_weight_init
        conv = functools.partial(
            self.conv, precision=self.precision, kernel_init=conv_init, matmul_1x1=self.matmul_1x1, **dtypes
        )
        norm = functools.partial(self.norm, use_running_average=not train, **dtypes)
        last_norm_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones

        pool = functools.partial(
            max_pool2d_argmax_grad if self.max_pool_argmax_grad else max_pool2d, kernel_size=3, stride=2, padding=1
        )
        stem: tuple[Callable[..., Any], ...]
        if self.stem == DEEP_STEM:
            stem = tuple(
                layer
                for in_channels, out_channels, stride in DEEP_STEM_CONVS
                for layer in (
                    functools.partial(conv, in_channels, out_channels, 3, stride, 1),
                    functools.partial(norm, out_channels),
                    relu,
                )
            )
            stem += (pool,)
        elif self.small_stem:
            stem = (
                functools.partial(conv, IN_CHANNELS, STEM_WIDTH, 3, 1, 1),
                functools.partial(norm, STEM_WIDTH),
                relu,
            )
        else:
            stem = (
                functools.partial(conv, IN_CHANNELS, STEM_WIDTH, 7, 2, 3, space_to_depth=self.space_to_depth_stem),
                functools.partial(norm, STEM_WIDTH),
                relu,
                pool,
            )
        outputs = {STEM: Sequential(stem, name=STEM)(x.astype(self.dtype))}
        x, in_channels = outputs[STEM], STEM_WIDTH
        for (name, width, stride), blocks in zip(STAGES, self.num_block, strict=True):
            layer, in_channels = self._make_layer(
                in_channels,
                width,
                blocks,
                stride,
                name,
                conv=conv,
                norm=norm,
                last_norm_scale_init=last_norm_init,
                se_bias_init=zero_bias_init if self.init_weights else torch_default_bias_init,
                **_block_options(self),
            )
            x = outputs[name] = layer(x)

        x = jnp.mean(x, axis=(1, 2))
        in_features = 512 * self.block.expansion
        kernel_init: Initializer
        bias_init: Initializer
        if self.init_weights:
            kernel_init, bias_init = seed_linear_init, nn.initializers.zeros
        else:
            kernel_init, bias_init = torch_default_weight_init, torch_default_bias_init(in_features)
        outputs[HEAD] = Linear(
            in_features,
            self.num_classes,
            precision=self.precision,
            kernel_init=kernel_init,
            bias_init=bias_init,
            name=HEAD,
            **dtypes,
        )(x)
        return outputs if return_stages else outputs[HEAD]


def build(arch: str, **options: Any) -> ResNet:
    """A ResNet by builder name (``ARCH_NAMES``: a depth or a variant), with ResNet's keyword options."""
    block_name, num_block, options = resolve_arch(arch, options)
    return ResNet(BLOCKS[block_name], num_block, **options)


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
