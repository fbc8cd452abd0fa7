"""Flax mirrors of the torch.nn layers the seed uses, with PyTorch's numerics.

Each difference from Flax's own layers is a named constant or field with its reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from resnet_arch import BN_COUNTER, BN_PARAMS, BN_STATS

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]
# Train-mode normalisation: (x, scale, bias, epsilon) -> (output, batch mean, biased batch variance).
TrainNorm = Callable[[Array, Array, Array, float], tuple[Array, Array, Array]]

# torch.nn.BatchNorm2d's momentum is the weight of the *new* batch; Flax's 0.9 weighs the old value.
TORCH_BN_MOMENTUM = 0.1
# torch.nn.BatchNorm2d's default epsilon (Flax's default is the same; named so nobody changes one side).
TORCH_BN_EPS = 1e-5
# Backends where a 1x1 convolution runs as a matrix product over channels (same result): XLA's CPU
# convolutions are slower than its dot there (docs/performance.md). On GPU cuDNN's convolution is the fast
# path, and XLA's Triton GEMM fusion aborts compiling a strided slice that feeds a float32 dot.
MATMUL_1X1_BACKENDS = ("cpu",)
# Flax has no BatchNorm counter; torch's num_batches_tracked is kept so round trips lose nothing.
COUNTER_DTYPE = jnp.int32
# BatchNorm2d's variable names: torch's weight/bias and running_mean/running_var under their Flax names.
BN_SCALE, BN_BIAS = BN_PARAMS["weight"], BN_PARAMS["bias"]
BN_MEAN, BN_VAR = BN_STATS["running_mean"], BN_STATS["running_var"]


def kaiming_normal_fan_out(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
    """The seed's conv init, torch.nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu").

    An untruncated normal with std sqrt(2 / fan_out), written out because the meaning of
    variance_scaling's "normal" (truncated or not) has changed across JAX releases.
    For an HWIO kernel fan_out is O*H*W, the same product torch takes for OIHW.
    """
    kh, kw, _, out_channels = shape
    std = np.sqrt(2.0 / (out_channels * kh * kw))
    return jax.random.normal(key, shape, dtype) * jnp.asarray(std, dtype)


# The seed's Linear init: normal(0, 0.01) weights, zero bias (Flax's Dense uses lecun_normal).
seed_linear_init = nn.initializers.normal(0.01)
# torch's default Conv2d/Linear weight init, kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_weight_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Initializer:
    """torch's default Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def per_channel(v: Array, ndim: int) -> Array:
    """A per-channel vector shaped to broadcast against channels-last input without rank promotion."""
    return v.reshape((1,) * (ndim - 1) + (v.shape[-1],))


class Conv2d(nn.Module):
    """torch.nn.Conv2d on NHWC input with an HWIO ``kernel``, and a ``bias`` only when ``use_bias``.

    Padding is symmetric ``((p, p), (p, p))`` as in torch; Flax's 'SAME' pads (0, 1) for stride 2
    on even sizes, which shifts every strided layer by one pixel.
    """

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Initializer = kaiming_normal_fan_out
    # The seed's convolutions have none; a convolution with its BatchNorm folded in has one (fold.py).
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"Conv2d expected {self.in_channels} input channels (NHWC), got shape {x.shape}")
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, self.in_channels, self.out_channels), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        if k == 1 and self.padding == 0 and jax.default_backend() in MATMUL_1X1_BACKENDS:
            x = x[:, :: self.stride, :: self.stride, :]
            y = jnp.einsum("nhwc,co->nhwo", x, kernel[0, 0], precision=self.precision)
        else:
            p = self.padding
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(self.stride, self.stride),
                padding=((p, p), (p, p)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision=self.precision,
            )
        if not self.use_bias:
            return y
        bias = self.param("bias", nn.initializers.zeros, (self.out_channels,), self.param_dtype)
        return y + per_channel(bias.astype(y.dtype), y.ndim)


def batch_norm(x: Array, mean: Array, var: Array, scale: Array, bias: Array, epsilon: float) -> Array:
    """(x - mean) * scale / sqrt(var + eps) + bias over the last axis, in x's dtype."""
    mul = scale * jax.lax.rsqrt(var + epsilon)
    return (x - per_channel(mean, x.ndim)) * per_channel(mul, x.ndim) + per_channel(bias, x.ndim)


def batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float) -> tuple[Array, Array, Array]:
    """Train-mode BatchNorm over every axis but the last, differentiated by JAX: the output, the
    batch mean and the biased batch variance, all in the dtype of scale (float32 or wider).

    The variance is two-pass, mean((x - mean)^2), and normalisation uses it, as torch does.
    """
    xf = x.astype(scale.dtype)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(xf, axes)
    var = jnp.mean(jnp.square(xf - per_channel(mean, x.ndim)), axes)
    return batch_norm(xf, mean, var, scale, bias, epsilon), mean, var


class BatchNorm2d(nn.Module):
    """torch.nn.BatchNorm2d over the channel (last) axis of NHWC input, with torch's semantics.

    ``scale``/``bias`` are torch's weight/bias; ``batch_stats`` holds ``mean``, ``var`` and
    ``num_batches_tracked``. Statistics are computed in at least float32 (bf16 in, float32 stats;
    float64 stays float64), as cuDNN does, and the output is cast back to the compute dtype.
    """

    num_features: int
    use_running_average: bool = True
    momentum: float = TORCH_BN_MOMENTUM
    epsilon: float = TORCH_BN_EPS
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    scale_init: Initializer = nn.initializers.ones
    # Train-mode normalisation; resnet_flax.fused swaps in one with a hand-written backward pass.
    train_norm: TrainNorm = batch_norm_train

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.num_features
        if x.shape[-1] != c:
            raise ValueError(f"BatchNorm2d expected {c} channels (NHWC), got shape {x.shape}")
        scale = self.param(BN_SCALE, self.scale_init, (c,), self.param_dtype)
        bias = self.param(BN_BIAS, nn.initializers.zeros, (c,), self.param_dtype)
        stats_dtype = jnp.promote_types(self.param_dtype, jnp.float32)
        ra_mean = self.variable("batch_stats", BN_MEAN, jnp.zeros, (c,), stats_dtype)
        ra_var = self.variable("batch_stats", BN_VAR, jnp.ones, (c,), stats_dtype)
        count = self.variable("batch_stats", BN_COUNTER, jnp.zeros, (), COUNTER_DTYPE)

        compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
        scale, bias = scale.astype(compute_dtype), bias.astype(compute_dtype)
        if self.use_running_average:
            mean, var = ra_mean.value.astype(compute_dtype), ra_var.value.astype(compute_dtype)
            y = batch_norm(x.astype(compute_dtype), mean, var, scale, bias, self.epsilon)
        else:
            y, mean, var = self.train_norm(x, scale, bias, self.epsilon)
            if not self.is_initializing():
                n = x.size // c
                # torch updates the running variance with the unbiased batch variance.
                unbiased = var * (n / max(n - 1, 1))
                m = self.momentum
                ra_mean.value = ((1 - m) * ra_mean.value + m * mean).astype(ra_mean.value.dtype)
                ra_var.value = ((1 - m) * ra_var.value + m * unbiased).astype(ra_var.value.dtype)
                count.value = count.value + 1
        return y.astype(self.dtype or x.dtype)


class Linear(nn.Module):
    """torch.nn.Linear on the last axis; ``kernel`` is (in, out), torch's weight transposed."""

    in_features: int
    out_features: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Initializer = seed_linear_init
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expected {self.in_features} input features, got shape {x.shape}")
        kernel = self.param("kernel", self.kernel_init, (self.in_features, self.out_features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.out_features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return jnp.dot(x, kernel, precision=self.precision) + bias.reshape(1, -1)


def max_pool2d(x: Array, kernel_size: int, stride: int, padding: int) -> Array:
    """torch.nn.MaxPool2d: symmetric padding with -inf (never 'SAME')."""
    p = padding
    return nn.max_pool(x, (kernel_size, kernel_size), strides=(stride, stride), padding=((p, p), (p, p)))


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
