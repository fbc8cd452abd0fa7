"""Flax NNX mirrors of the torch.nn layers the seed uses, with PyTorch's numerics.

The same layers as ``resnet_flax.layers`` (linen), computing with the same functions and
constants (``resnet_flax.ops``), so both APIs give the same bits: parameters are ``nnx.Param``,
BatchNorm's running statistics and counter ``nnx.BatchStat`` (linen's ``batch_stats`` collection).
Each layer holds its variables under linen's leaf names (``kernel``, ``scale``, ``bias``, ``mean``,
``var``, ``num_batches_tracked``), and ``Sequential`` names its children "0", "1", ... as torch does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

from .levers import max_pool2d_argmax_grad
from .ops import (
    COUNTER_DTYPE,
    TORCH_BN_EPS,
    TORCH_BN_MOMENTUM,
    Dtype,
    Initializer,
    TrainNorm,
    avg_pool2d,
    batch_norm2d,
    batch_norm_train,
    check_last_axis,
    conv2d,
    kaiming_normal_fan_out,
    linear,
    max_pool2d,
    seed_linear_init,
    stats_dtype,
)

Array = jax.Array


class Conv2d(nnx.Module):
    """torch.nn.Conv2d on NHWC input with an HWIO ``kernel`` ((k, k, in / groups, out)), and a ``bias``
    only when ``use_bias``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        groups: int = 1,
        # The seed's convolutions have none; squeeze-and-excitation's have one, and resnet_flax.nnx.fold
        # gives each convolution one.
        use_bias: bool = False,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = kaiming_normal_fan_out,
        bias_init: Initializer = nnx.initializers.zeros,
        # Speed levers, as the linen Conv2d's (resnet_flax.levers).
        matmul_1x1: bool | None = None,
        space_to_depth: bool = False,
        rngs: nnx.Rngs,
    ) -> None:
        self.matmul_1x1, self.space_to_depth = matmul_1x1, space_to_depth
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.groups = kernel_size, stride, padding, groups
        self.dtype, self.precision = dtype, precision
        k = kernel_size
        shape = (k, k, in_channels // groups, out_channels)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        # Data even when absent, so fold can add one later.
        self.bias = nnx.data(nnx.Param(bias_init(rngs.params(), (out_channels,), param_dtype)) if use_bias else None)

    def __call__(self, x: Array) -> Array:
        check_last_axis(x, self.in_channels, "Conv2d", "input channels (NHWC)")
        x, kernel = promote_dtype((x, self.kernel[...]), dtype=self.dtype)
        bias = None if self.bias is None else self.bias[...]
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


class BatchNorm2d(nnx.Module):
    """torch.nn.BatchNorm2d over the channel (last) axis of NHWC input, with torch's semantics.

    ``scale``/``bias`` (``nnx.Param``) are torch's weight/bias; ``mean``, ``var`` and
    ``num_batches_tracked`` (``nnx.BatchStat``) its buffers. ``use_running_average`` is the mode
    (``model.eval()`` sets it, ``model.train()`` clears it, as ``nnx.view`` can); a train-mode call
    normalises with the batch statistics and updates the buffers in place as torch does.
    ``nnx.BatchNorm`` is not used: its momentum weighs the old value and its running variance is
    biased. ``train_norm`` is the train-mode normalisation (``resnet_flax.nnx.fused`` swaps in the
    fused one).
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool = False,
        momentum: float = TORCH_BN_MOMENTUM,
        epsilon: float = TORCH_BN_EPS,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        scale_init: Initializer = nnx.initializers.ones,
        train_norm: TrainNorm = batch_norm_train,
        rngs: nnx.Rngs,
    ) -> None:
        c = self.num_features = num_features
        self.use_running_average = use_running_average
        self.momentum, self.epsilon, self.dtype = momentum, epsilon, dtype
        self.train_norm = train_norm
        self.scale = nnx.Param(scale_init(rngs.params(), (c,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((c,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((c,), stats_dtype(param_dtype)))
        self.var = nnx.BatchStat(jnp.ones((c,), stats_dtype(param_dtype)))
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), COUNTER_DTYPE))

    def set_view(self, use_running_average: bool | None = None, train_norm: TrainNorm | None = None) -> None:
        """``nnx.view``'s hook: the mode, and the train-mode normalisation."""
        if use_running_average is not None:
            self.use_running_average = use_running_average
        if train_norm is not None:
            self.train_norm = train_norm

    def __call__(self, x: Array) -> Array:
        check_last_axis(x, self.num_features, "BatchNorm2d", "channels (NHWC)")
        y, new_stats = batch_norm2d(
            x,
            self.scale[...],
            self.bias[...],
            self.mean[...],
            self.var[...],
            use_running_average=self.use_running_average,
            momentum=self.momentum,
            epsilon=self.epsilon,
            dtype=self.dtype,
            train_norm=self.train_norm,
        )
        if new_stats is not None:
            self.mean[...], self.var[...] = new_stats
            self.num_batches_tracked[...] += 1
        return y


class FoldedBatchNorm(nnx.Module):
    """Where a BatchNorm2d stood before folding: the identity (its affine map now lives in the
    convolution before it). It holds no variables and refuses train mode."""

    def __init__(self) -> None:
        self.use_running_average = True

    def set_view(self, use_running_average: bool | None = None) -> None:
        """``nnx.view``'s hook: the mode (train mode is refused when called)."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: Array) -> Array:
        if not self.use_running_average:
            raise ValueError("a folded ResNet is inference-only: call model.eval() first")
        return x


class Linear(nnx.Module):
    """torch.nn.Linear on the last axis; ``kernel`` is (in, out), torch's weight transposed."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = seed_linear_init,
        bias_init: Initializer = nnx.initializers.zeros,
        rngs: nnx.Rngs,
    ) -> None:
        self.in_features, self.dtype, self.precision = in_features, dtype, precision
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))

    def __call__(self, x: Array) -> Array:
        check_last_axis(x, self.in_features, "Linear", "input features")
        x, kernel, bias = promote_dtype((x, self.kernel[...], self.bias[...]), dtype=self.dtype)
        return linear(x, kernel, bias, self.precision)


class MaxPool2d(nnx.Module):
    """torch.nn.MaxPool2d: symmetric padding with -inf (never 'SAME'); no variables."""

    def __init__(self, kernel_size: int, stride: int, padding: int, *, argmax_grad: bool = False) -> None:
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.argmax_grad = argmax_grad  # the backward pass of resnet_flax.levers.max_pool2d_argmax_grad

    def __call__(self, x: Array) -> Array:
        pool = max_pool2d_argmax_grad if self.argmax_grad else max_pool2d
        return pool(x, self.kernel_size, self.stride, self.padding)


class AvgPool2d(nnx.Module):
    """torch.nn.AvgPool2d(kernel_size, stride, ceil_mode=True, count_include_pad=False); no variables."""

    def __init__(self, kernel_size: int, stride: int) -> None:
        self.kernel_size, self.stride = kernel_size, stride

    def __call__(self, x: Array) -> Array:
        return avg_pool2d(x, self.kernel_size, self.stride)


class Sequential(nnx.Module):
    """torch.nn.Sequential: children are the attributes "0", "1", ... by position, as torch names them.

    Layers without variables (ReLU, max-pool) take an index too, so variable paths match torch's
    keys: ``conv2_x/0/residual_function/3/kernel`` is ``conv2_x.0.residual_function.3.weight``.
    """

    def __init__(self, *layers: Callable[[Array], Array]) -> None:
        self.num_layers = len(layers)
        for i, layer in enumerate(layers):
            setattr(self, str(i), layer)

    def _name(self, index: int) -> str:
        if not 0 <= index < self.num_layers:
            raise IndexError(f"Sequential of {self.num_layers} layers has no index {index}")
        return str(index)

    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, index: int) -> Any:
        return getattr(self, self._name(index))

    def __setitem__(self, index: int, layer: Callable[[Array], Array]) -> None:
        setattr(self, self._name(index), layer)

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(self.num_layers))

    def __call__(self, x: Array) -> Array:
        for layer in self:
            x = layer(x)
        return x
