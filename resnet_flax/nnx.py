"""The seed's ResNet in Flax NNX: same classes, builders and module tree as resnet_torch and the linen mirror.

Input is NHWC (N, H, W, 3). Attributes carry torch's module names (``conv1``, ``conv2_x``,
``residual_function``, ``shortcut``, ``fc``) and Sequentials name their children "0", "1", ...,
so ``nnx.state(model)`` has the paths of the linen variables, leaf for leaf:
``conv2_x/0/residual_function/0/kernel`` (an ``nnx.Param``) and ``conv2_x/0/residual_function/1/mean``
(an ``nnx.BatchStat``, linen's ``batch_stats`` collection). One converter rule serves both APIs.

A model is built in train mode, as NNX's and torch's modules are: ``model.eval()`` (or
``nnx.view(model, use_running_average=True)``) switches BatchNorm to its running statistics,
``model.train()`` back; a train-mode call updates the statistics in place as torch does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

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

from .fold import fold_conv_bn
from .fused import FUSED_TRAIN_NORMS, fused_batch_norm_train, fused_batch_norm_train_two_pass
from .levers import check_stem_levers
from .nnx_layers import AvgPool2d, BatchNorm2d, Conv2d, FoldedBatchNorm, Linear, MaxPool2d, Sequential
from .ops import (
    BN_BIAS,
    BN_MEAN,
    BN_SCALE,
    BN_VAR,
    Dtype,
    Initializer,
    check_input,
    excite,
    identity,
    kaiming_normal_fan_out,
    relu,
    seed_linear_init,
    squeeze,
    torch_default_bias_init,
    torch_default_weight_init,
    zero_bias_init,
)

Array = jax.Array


def _shortcut(
    in_channels: int, out_channels: int, stride: int, avg_down: bool, conv: Any, norm: Any
) -> Sequential | None:
    """Projection (1x1 conv + BN) when the shape changes, else None (the identity); with ``avg_down`` a
    ceil-mode average pool (the identity at stride 1) carries the stride before a stride-1 projection."""
    if stride == 1 and in_channels == out_channels:
        return None
    if avg_down:
        pool = AvgPool2d(AVG_DOWN_KERNEL, stride) if stride != 1 else identity
        return Sequential(pool, conv(in_channels, out_channels, 1), norm(out_channels))
    return Sequential(conv(in_channels, out_channels, 1, stride), norm(out_channels))


class SqueezeExcite(nnx.Module):
    """Squeeze-and-excitation (timm's SEModule): the channels' spatial mean through ``fc1`` (1x1 conv with
    bias), ReLU, ``fc2`` (1x1 conv with bias) and a sigmoid scales each channel of the input.

    ``bias_init`` maps a convolution's fan-in to its bias initializer.
    """

    def __init__(
        self,
        channels: int,
        *,
        conv: Callable[..., Conv2d] = Conv2d,
        bias_init: Callable[[int], Initializer] = zero_bias_init,
        rngs: nnx.Rngs,
    ) -> None:
        reduced = se_width(channels)
        self.fc1 = conv(channels, reduced, 1, use_bias=True, bias_init=bias_init(channels), rngs=rngs)
        self.fc2 = conv(reduced, channels, 1, use_bias=True, bias_init=bias_init(reduced), rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return excite(x, self.fc2(relu(self.fc1(squeeze(x)))))


class _Block(nnx.Module):
    """What both blocks share: ``residual_function`` (the block's layers), the optional ``se``, the
    shortcut and the sum."""

    expansion: ClassVar[int]

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
        conv: Callable[..., Conv2d] = Conv2d,
        norm: Callable[..., BatchNorm2d] = BatchNorm2d,
        last_norm_scale_init: Initializer = nnx.initializers.ones,
        se_bias_init: Callable[[int], Initializer] = zero_bias_init,
        rngs: nnx.Rngs,
    ) -> None:
        c, n = functools.partial(conv, rngs=rngs), functools.partial(norm, rngs=rngs)
        self.groups, self.width_per_group = groups, width_per_group
        layers = self._layers(in_channels, out_channels, stride, c, n, last_norm_scale_init)
        self.residual_function = Sequential(*layers)
        expanded = out_channels * self.expansion
        self.se = SqueezeExcite(expanded, conv=conv, bias_init=se_bias_init, rngs=rngs) if se else None
        self.shortcut = _shortcut(in_channels, expanded, stride, avg_down, c, n)

    def _layers(
        self, in_channels: int, out_channels: int, stride: int, c: Any, n: Any, last_norm_scale_init: Initializer
    ) -> tuple[Callable[[Array], Array], ...]:
        raise NotImplementedError

    def __call__(self, x: Array) -> Array:
        out = self.residual_function(x)
        if self.se is not None:
            out = self.se(out)
        return relu(out + (x if self.shortcut is None else self.shortcut(x)))


class BasicBlock(_Block):
    """Two 3x3 convolutions (ResNet-18/34); no groups or widths other than torchvision's defaults."""

    expansion: ClassVar[int] = 1

    def _layers(
        self, in_channels: int, out_channels: int, stride: int, c: Any, n: Any, last_norm_scale_init: Initializer
    ) -> tuple[Callable[[Array], Array], ...]:
        check_block_options("BasicBlock", self.groups, self.width_per_group)
        return (
            c(in_channels, out_channels, 3, stride, 1),
            n(out_channels),
            relu,
            c(out_channels, out_channels, 3, 1, 1),
            n(out_channels, scale_init=last_norm_scale_init),
        )


class BottleNeck(_Block):
    """1x1 -> 3x3 -> 1x1 convolutions (ResNet-50/101/152), the stride on the 3x3 ("ResNet v1.5"); so do
    ``groups`` (ResNeXt). The inner width is torchvision's ``bottleneck_width`` (Wide ResNet, ResNeXt)."""

    expansion: ClassVar[int] = 4

    def _layers(
        self, in_channels: int, out_channels: int, stride: int, c: Any, n: Any, last_norm_scale_init: Initializer
    ) -> tuple[Callable[[Array], Array], ...]:
        width = bottleneck_width(out_channels, self.groups, self.width_per_group)
        expanded = out_channels * self.expansion
        return (
            c(in_channels, width, 1),
            n(width),
            relu,
            c(width, width, 3, stride, 1, groups=self.groups),
            n(width),
            relu,
            c(width, expanded, 1),
            n(expanded, scale_init=last_norm_scale_init),
        )


BLOCKS: dict[str, type[BasicBlock] | type[BottleNeck]] = {
    "BasicBlock": BasicBlock,
    "BottleNeck": BottleNeck,
}


class ResNet(nnx.Module):
    """The seed's ResNet: stem ``conv1``, stages ``conv2_x``..``conv5_x``, average pool, ``fc``.

    The options are the linen ResNet's (``dtype`` computes, ``param_dtype`` stores, ``precision``
    goes to every convolution and matrix product, the speed levers ``matmul_1x1``,
    ``space_to_depth_stem`` and ``max_pool_argmax_grad``), plus ``rngs`` for the initial weights.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[BottleNeck],
        num_block: Sequence[int],
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
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        precision: Any = None,
        matmul_1x1: bool | None = None,
        space_to_depth_stem: bool = False,
        max_pool_argmax_grad: bool = False,
        rngs: nnx.Rngs,
    ) -> None:
        family = dict(groups=groups, width_per_group=width_per_group, avg_down=avg_down, se=se)
        check_options(block, num_block, num_classes, BLOCKS, stem=stem, small_stem=small_stem, **family)
        check_stem_levers(
            stem=stem,
            small_stem=small_stem,
            space_to_depth_stem=space_to_depth_stem,
            max_pool_argmax_grad=max_pool_argmax_grad,
        )
        self.block, self.num_block, self.num_classes = block, tuple(num_block), num_classes
        self.init_weights, self.zero_init_residual, self.small_stem = init_weights, zero_init_residual, small_stem
        self.groups, self.width_per_group, self.stem = groups, width_per_group, stem
        self.avg_down, self.se = avg_down, se
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        conv_init = kaiming_normal_fan_out if init_weights else torch_default_weight_init
        conv = functools.partial(Conv2d, precision=precision, kernel_init=conv_init, matmul_1x1=matmul_1x1, **dtypes)
        norm = functools.partial(BatchNorm2d, **dtypes)
        last_norm_init = nnx.initializers.zeros if zero_init_residual else nnx.initializers.ones

        c, n = functools.partial(conv, rngs=rngs), functools.partial(norm, rngs=rngs)
        pool = MaxPool2d(3, 2, 1, argmax_grad=max_pool_argmax_grad)
        if stem == DEEP_STEM:
            self.conv1 = Sequential(
                *(layer for i, o, s in DEEP_STEM_CONVS for layer in (c(i, o, 3, s, 1), n(o), relu)), pool
            )
        elif small_stem:
            self.conv1 = Sequential(c(IN_CHANNELS, STEM_WIDTH, 3, 1, 1), n(STEM_WIDTH), relu)
        else:
            stem_conv = c(IN_CHANNELS, STEM_WIDTH, 7, 2, 3, space_to_depth=space_to_depth_stem)
            self.conv1 = Sequential(stem_conv, n(STEM_WIDTH), relu, pool)
        in_channels = STEM_WIDTH
        for (name, width, stride), blocks in zip(STAGES, self.num_block, strict=True):
            layer, in_channels = self._make_layer(
                in_channels,
                width,
                blocks,
                stride,
                conv=conv,
                norm=norm,
                last_norm_scale_init=last_norm_init,
                se_bias_init=zero_bias_init if init_weights else torch_default_bias_init,
                rngs=rngs,
                **family,
            )
            setattr(self, name, layer)

        in_features = 512 * block.expansion
        linear_init = (
            dict(kernel_init=seed_linear_init, bias_init=nnx.initializers.zeros)
            if init_weights
            else dict(kernel_init=torch_default_weight_init, bias_init=torch_default_bias_init(in_features))
        )
        self.fc = Linear(in_features, num_classes, precision=precision, rngs=rngs, **dtypes, **linear_init)

    def _make_layer(
        self, in_channels: int, out_channels: int, num_blocks: int, stride: int, **block_kwargs: Any
    ) -> tuple[Sequential, int]:
        """One stage: the first block takes the stride (and the projection), the rest stride 1."""
        strides = [stride] + [1] * (num_blocks - 1)
        layers = []
        for stride in strides:
            layers.append(self.block(in_channels, out_channels, stride, **block_kwargs))
            in_channels = out_channels * self.block.expansion
        return Sequential(*layers), in_channels

    def __call__(self, x: Array, *, return_stages: bool = False) -> Array | dict[str, Array]:
        """NHWC images (N, H, W, 3) -> logits (N, num_classes), or every stage's output by name."""
        check_input(x)
        outputs = {STEM: self.conv1(x.astype(self.dtype))}
        x = outputs[STEM]
        for name, _, _ in STAGES:
            x = outputs[name] = getattr(self, name)(x)
        x = jnp.mean(x, axis=(1, 2))
        outputs[HEAD] = self.fc(x)
        return outputs if return_stages else outputs[HEAD]


def build(arch: str, **options: Any) -> ResNet:
    """A ResNet by builder name (``ARCH_NAMES``: a depth or a variant), with ResNet's keyword options and ``rngs``."""
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


def _check_unfolded(model: Any, what: str) -> None:
    """TypeError unless ``model`` is a resnet_flax.nnx.ResNet whose BatchNorms are not folded."""
    if not isinstance(model, ResNet):
        raise TypeError(f"{what} expects a resnet_flax.nnx.ResNet, got {type(model).__name__}")
    if is_folded(model):
        raise TypeError(f"{what} expects a resnet_flax.nnx.ResNet whose BatchNorms are not folded")


def fused(model: ResNet, *, two_pass: bool = False) -> ResNet:
    """``model`` with the fused train-mode BatchNorm (``resnet_flax.fused``; its variance in two passes with
    ``two_pass``): a view that shares its variables (``nnx.view``), so training the view trains the model.
    Eval mode is unchanged."""
    _check_unfolded(model, "fused")
    return nnx.view(model, train_norm=fused_batch_norm_train_two_pass if two_pass else fused_batch_norm_train)


def is_fused(model: ResNet) -> bool:
    """Whether the model's train-mode BatchNorm is the fused one."""
    return any(isinstance(m, BatchNorm2d) and m.train_norm in FUSED_TRAIN_NORMS for _, m in nnx.iter_modules(model))


def is_folded(model: ResNet) -> bool:
    """Whether ``fold`` made this model (its BatchNorms live in the convolutions)."""
    return any(isinstance(m, FoldedBatchNorm) for _, m in nnx.iter_modules(model))


def fold(model: ResNet) -> ResNet:
    """An inference-only copy of ``model`` (in eval mode) with every BatchNorm folded into the convolution
    before it, as ``resnet_flax.fold.fold`` does for linen: each convolution gains a ``bias``, each
    BatchNorm becomes the identity (``FoldedBatchNorm``), other paths are kept. ``model`` is unchanged.
    """
    _check_unfolded(model, "fold")
    folded = nnx.clone(model)
    for path, seq in list(nnx.iter_modules(folded)):
        if not isinstance(seq, Sequential):
            continue
        where = "/".join(map(str, path))
        for i in range(len(seq)):
            layer = seq[i]
            if isinstance(layer, BatchNorm2d):
                raise ValueError(f"BatchNorm at {where}/{i} does not follow a convolution; cannot fold it")
            if isinstance(layer, Conv2d):
                norm = seq[i + 1] if i + 1 < len(seq) else None
                if not isinstance(norm, BatchNorm2d):
                    raise ValueError(f"convolution at {where}/{i} has no BatchNorm after it; cannot fold it")
                _fold_into(layer, norm)
                seq[i + 1] = FoldedBatchNorm()
    folded.eval()
    return folded


def _fold_into(conv: Conv2d, norm: BatchNorm2d) -> None:
    """Give ``conv`` the kernel and bias of itself followed by ``norm`` in eval mode."""
    pair = fold_conv_bn(
        {"kernel": conv.kernel[...]},
        {BN_SCALE: norm.scale[...], BN_BIAS: norm.bias[...]},
        {BN_MEAN: norm.mean[...], BN_VAR: norm.var[...]},
        norm.epsilon,
    )
    conv.kernel[...] = pair["kernel"]
    conv.bias = nnx.Param(pair["bias"])
