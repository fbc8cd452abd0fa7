"""Flax linen mirrors of the torch.nn layers the seed uses, with PyTorch's numerics.

Each layer holds its variables and computes with ``resnet_flax.ops``, the arithmetic the NNX
layers (``resnet_flax.nnx_layers``) share; each difference from Flax's own layers is named there.
Options after the layer's shape are keyword-only, as in the NNX layers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from resnet_arch import BN_COUNTER

from .ops import (
    BN_BIAS,
    BN_MEAN,
    BN_SCALE,
    BN_VAR,
    COUNTER_DTYPE,
    TORCH_BN_EPS,
    TORCH_BN_MOMENTUM,
    Dtype,
    Initializer,
    TrainNorm,
    batch_norm2d,
    batch_norm_train,
    check_last_axis,
    conv2d,
    kaiming_normal_fan_out,
    linear,
    seed_linear_init,
    stats_dtype,
)

Array = jax.Array


class Conv2d(nn.Module):
    """torch.nn.Conv2d on NHWC input with an HWIO ``kernel`` ((k, k, in / groups, out)), and a ``bias``
    only when ``use_bias``."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    _: dataclasses.KW_ONLY
    groups: int = 1
    # The seed's convolutions have none; squeeze-and-excitation's have one, and so does a convolution
    # with its BatchNorm folded in (fold.py).
    use_bias: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Initializer = kaiming_normal_fan_out
    bias_init: Initializer = nn.initializers.zeros
    # Speed levers, the same function (resnet_flax.levers): 1x1 as a matrix product (None: the backend's
    # default), a strided convolution on a space-to-depth input.
    matmul_1x1: bool | None = None
    space_to_depth: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        check_last_axis(x, self.in_channels, "Conv2d", "input channels (NHWC)")
        k = self.kernel_size
        shape = (k, k, self.in_channels // self.groups, self.out_channels)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.out_channels,), self.param_dtype) if self.use_bias else None
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return conv2d(
            x,
            kernel,
            bias,
            self.stride,
            self.padding,
            self.precision,
            self.groups,
            matmul_1x1=self.matmul_1x1,
            space_to_depth=self.space_to_depth,
        )


class BatchNorm2d(nn.Module):
    """torch.nn.BatchNorm2d over the channel (last) axis of NHWC input, with torch's semantics.

    ``scale``/``bias`` are torch's weight/bias; ``batch_stats`` holds ``mean``, ``var`` and
    ``num_batches_tracked``. ``use_running_average`` is the mode (torch's ``eval()``); a train-mode
    call normalises with the batch statistics and updates ``batch_stats`` as torch does (not while
    initialising). ``train_norm`` is the train-mode normalisation (``resnet_flax.fused`` swaps in
    the fused one).
    """

    num_features: int
    _: dataclasses.KW_ONLY
    use_running_average: bool = False
    momentum: float = TORCH_BN_MOMENTUM
    epsilon: float = TORCH_BN_EPS
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    scale_init: Initializer = nn.initializers.ones
    train_norm: TrainNorm = batch_norm_train

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.num_features
        check_last_axis(x, c, "BatchNorm2d", "channels (NHWC)")
        scale = self.param(BN_SCALE, self.scale_init, (c,), self.param_dtype)
        bias = self.param(BN_BIAS, nn.initializers.zeros, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", BN_MEAN, jnp.zeros, (c,), stats_dtype(self.param_dtype))
        ra_var = self.variable("batch_stats", BN_VAR, jnp.ones, (c,), stats_dtype(self.param_dtype))
        count = self.variable("batch_stats", BN_COUNTER, jnp.zeros, (), COUNTER_DTYPE)
        y, new_stats = batch_norm2d(
            x,
            scale,
            bias,
            ra_mean.value,
            ra_var.value,
            use_running_average=self.use_running_average,
            momentum=self.momentum,
            epsilon=self.epsilon,
            dtype=self.dtype,
            train_norm=self.train_norm,
        )
        if new_stats is not None and not self.is_initializing():
            ra_mean.value, ra_var.value = new_stats
            count.value = count.value + 1
        return y


class Linear(nn.Module):
    """torch.nn.Linear on the last axis; ``kernel`` is (in, out), torch's weight transposed."""

    in_features: int
    out_features: int
    _: dataclasses.KW_ONLY
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Initializer = seed_linear_init
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array) -> Array:
        check_last_axis(x, self.in_features, "Linear", "input features")
        kernel = self.param("kernel", self.kernel_init, (self.in_features, self.out_features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.out_features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return linear(x, kernel, bias, self.precision)


def _is_module_factory(layer: Any) -> bool:
    func = layer.func if isinstance(layer, functools.partial) else layer
    return isinstance(func, type) and issubclass(func, nn.Module)


class Sequential(nn.Module):
    """torch.nn.Sequential: children named "0", "1", ... by position, as torch names them.

    ``layers`` holds module classes or partials of them (built here, named by index) and plain
    functions (relu, pooling), which take an index too, so parameter paths match torch's keys.
    """

    layers: Sequence[Callable[..., Any]]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i, layer in enumerate(self.layers):
            x = layer(name=str(i))(x) if _is_module_factory(layer) else layer(x)
        return x
