"""Flax NNX mirrors of the torch.nn layers the seed uses, with PyTorch's numerics.

The same layers as ``resnet_flax.layers`` (linen), computing with the same functions and
constants, so both APIs give the same numbers: parameters are ``nnx.Param``, BatchNorm's running
statistics and counter ``nnx.BatchStat`` (linen's ``batch_stats`` collection). Each layer holds
its variables under linen's leaf names (``kernel``, ``scale``, ``bias``, ``mean``, ``var``,
``num_batches_tracked``), and ``Sequential`` names its children "0", "1", ... as torch does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

from .layers import (
    COUNTER_DTYPE,
    MATMUL_1X1_BACKENDS,
    TORCH_BN_EPS,
    TORCH_BN_MOMENTUM,
    Dtype,
    Initializer,
    batch_norm,
    batch_norm_train,
    kaiming_normal_fan_out,
    max_pool2d,
    per_channel,
    seed_linear_init,
)

Array = jax.Array
# Train-mode normalisation: (x, scale, bias, epsilon) -> (output, batch mean, biased batch variance).
TrainNorm = Callable[[Array, Array, Array, float], tuple[Array, Array, Array]]


def conv2d_nhwc(x: Array, kernel: Array, stride: int, padding: int, precision: Any) -> Array:
    """torch's Conv2d on NHWC input and an HWIO kernel, symmetric padding ``((p, p), (p, p))``.

    A 1x1 convolution without padding runs as a matrix product on MATMUL_1X1_BACKENDS, as the
    linen Conv2d does (the same operations, so both APIs give the same bits).
    """
    if kernel.shape[:2] == (1, 1) and padding == 0 and jax.default_backend() in MATMUL_1X1_BACKENDS:
        x = x[:, ::stride, ::stride, :]
        return jnp.einsum("nhwc,co->nhwo", x, kernel[0, 0], precision=precision)
    p = padding
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision,
    )


class Conv2d(nnx.Module):
    """torch.nn.Conv2d on NHWC input with an HWIO ``kernel``; no bias unless ``bias=True``.

    Padding is symmetric ``((p, p), (p, p))`` as in torch (Flax's 'SAME' pads (0, 1) for stride 2
    on even sizes). A bias appears where ``resnet_flax.nnx.fold`` folds a BatchNorm in.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        bias: bool = False,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = kaiming_normal_fan_out,
        rngs: nnx.Rngs,
    ) -> None:
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dtype, self.precision = dtype, precision
        k = kernel_size
        self.kernel = nnx.Param(kernel_init(rngs.params(), (k, k, in_channels, out_channels), param_dtype))
        # Data even when absent, so fold can add one later.
        self.bias = nnx.data(nnx.Param(jnp.zeros((out_channels,), param_dtype)) if bias else None)

    def __call__(self, x: Array) -> Array:
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"Conv2d expected {self.in_channels} input channels (NHWC), got shape {x.shape}")
        x, kernel = promote_dtype((x, self.kernel[...]), dtype=self.dtype)
        y = conv2d_nhwc(x, kernel, self.stride, self.padding, self.precision)
        if self.bias is None:
            return y
        return y + per_channel(self.bias[...].astype(y.dtype), y.ndim)


def torch_running_stats(
    mean: Array, var: Array, batch_mean: Array, batch_var: Array, n: int, momentum: float
) -> tuple[Array, Array]:
    """torch's running-statistics update: momentum weighs the new batch, the variance is unbiased (n/(n-1))."""
    unbiased = batch_var * (n / max(n - 1, 1))
    new_mean = (1 - momentum) * mean + momentum * batch_mean
    new_var = (1 - momentum) * var + momentum * unbiased
    return new_mean.astype(mean.dtype), new_var.astype(var.dtype)


class BatchNorm2d(nnx.Module):
    """torch.nn.BatchNorm2d over the channel (last) axis of NHWC input, with torch's semantics.

    ``scale``/``bias`` (``nnx.Param``) are torch's weight/bias; ``mean``, ``var`` and
    ``num_batches_tracked`` (``nnx.BatchStat``) its buffers. ``use_running_average`` is the mode
    (``model.eval()`` sets it, ``model.train()`` clears it, as ``nnx.view`` can); a train-mode call
    normalises with the batch statistics and updates the buffers in place as torch does. Statistics
    are computed in at least float32 (bf16 in, float32 stats; float64 stays float64).
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
        stats_dtype = jnp.promote_types(param_dtype, jnp.float32)
        self.mean = nnx.BatchStat(jnp.zeros((c,), stats_dtype))
        self.var = nnx.BatchStat(jnp.ones((c,), stats_dtype))
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), COUNTER_DTYPE))

    def set_view(self, use_running_average: bool | None = None, train_norm: TrainNorm | None = None) -> None:
        """``nnx.view``'s hook: the mode, and the train-mode normalisation."""
        if use_running_average is not None:
            self.use_running_average = use_running_average
        if train_norm is not None:
            self.train_norm = train_norm

    def __call__(self, x: Array) -> Array:
        c = self.num_features
        if x.shape[-1] != c:
            raise ValueError(f"BatchNorm2d expected {c} channels (NHWC), got shape {x.shape}")
        compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
        scale, bias = self.scale[...].astype(compute_dtype), self.bias[...].astype(compute_dtype)
        if self.use_running_average:
            mean, var = self.mean[...].astype(compute_dtype), self.var[...].astype(compute_dtype)
            y = batch_norm(x.astype(compute_dtype), mean, var, scale, bias, self.epsilon)
        else:
            y, mean, var = self.train_norm(x, scale, bias, self.epsilon)
            self.mean[...], self.var[...] = torch_running_stats(
                self.mean[...], self.var[...], mean, var, x.size // c, self.momentum
            )
            self.num_batches_tracked[...] += 1
        return y.astype(self.dtype or x.dtype)


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
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expected {self.in_features} input features, got shape {x.shape}")
        x, kernel, bias = promote_dtype((x, self.kernel[...], self.bias[...]), dtype=self.dtype)
        return jnp.dot(x, kernel, precision=self.precision) + bias.reshape(1, -1)


class MaxPool2d(nnx.Module):
    """torch.nn.MaxPool2d: symmetric padding with -inf (never 'SAME'); no variables."""

    def __init__(self, kernel_size: int, stride: int, padding: int) -> None:
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def __call__(self, x: Array) -> Array:
        return max_pool2d(x, self.kernel_size, self.stride, self.padding)


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
