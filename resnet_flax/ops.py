"""The arithmetic of the torch.nn layers the seed uses, as pure jax functions, with PyTorch's numerics.

The linen layers (``resnet_flax.layers``) and the NNX layers (``resnet_flax.nnx_layers``) both
compute with these functions and constants, so each formula is written once and both APIs give
the same bits. Each difference from Flax's own layers is a named constant with its reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_arch import BN_PARAMS, BN_STATS, IN_CHANNELS

from .levers import conv2d_1x1_as_dot, conv2d_space_to_depth

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]
# Train-mode normalisation: (x, scale, bias, epsilon) -> (output, batch mean, biased batch variance).
TrainNorm = Callable[[Array, Array, Array, float], tuple[Array, Array, Array]]

# torch.nn.BatchNorm2d's momentum is the weight of the *new* batch; Flax's 0.9 weighs the old value.
TORCH_BN_MOMENTUM = 0.1
# torch.nn.BatchNorm2d's default epsilon (Flax's default is the same; named so nobody changes one side).
TORCH_BN_EPS = 1e-5
# BatchNorm statistics are at least float32 (bf16 training keeps float32 ones, as Flax's BatchNorm does) and
# float64 with float64 parameters, for the exactness checks (Flax's BatchNorm keeps float32 there).
MIN_STATS_DTYPE = jnp.float32
# torch's num_batches_tracked is int64; JAX without x64 has no int64, and a count of steps fits int32.
COUNTER_DTYPE = jnp.int32
# Flax's layout, channels last with HWIO kernels (torch: NCHW input, OIHW weights; parity's converter transposes).
CONV_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
# Backends where a 1x1 convolution runs as a matrix product over channels (same result): XLA's CPU
# convolutions are slower than its dot there (docs/performance.md). On GPU cuDNN's convolution is the fast
# path, and XLA's Triton GEMM fusion aborts compiling a strided slice that feeds a float32 dot.
MATMUL_1X1_BACKENDS = ("cpu",)
# BatchNorm2d's variable names: torch's weight/bias and running_mean/running_var under their Flax names.
BN_SCALE, BN_BIAS = BN_PARAMS["weight"], BN_PARAMS["bias"]
BN_MEAN, BN_VAR = BN_STATS["running_mean"], BN_STATS["running_var"]

# torch.nn.ReLU (linen's nn.relu and NNX's nnx.relu are this function).
relu = jax.nn.relu


# ---------------------------------------------------------------- initializers


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
seed_linear_init = jax.nn.initializers.normal(0.01)
# torch's default Conv2d/Linear weight init, kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_weight_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Initializer:
    """torch's default Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def zero_bias_init(fan_in: int) -> Initializer:
    """The seed's convolution bias init (squeeze-and-excitation's convolutions): zeros, whatever the fan-in."""
    del fan_in
    return jax.nn.initializers.zeros


# ---------------------------------------------------------------- checks


def check_last_axis(x: Array, size: int, layer: str, what: str) -> None:
    """Raise ValueError unless x's last axis has ``size`` entries (``what`` names them in the message)."""
    if x.shape[-1] != size:
        raise ValueError(f"{layer} expected {size} {what}, got shape {x.shape}")


def check_input(x: Array) -> None:
    """Raise ValueError unless x is an NHWC batch of 3-channel images."""
    if x.ndim != 4:
        raise ValueError(
            f"expected NHWC input of rank 4 (batch, height, width, {IN_CHANNELS}), got rank {x.ndim} shape {x.shape}"
        )
    if x.shape[-1] != IN_CHANNELS:
        hint = " (it looks like NCHW: transpose with x.transpose(0, 2, 3, 1))" if x.shape[1] == IN_CHANNELS else ""
        raise ValueError(f"expected NHWC input with {IN_CHANNELS} channels last, got shape {x.shape}{hint}")


# ---------------------------------------------------------------- layers


def per_channel(v: Array, ndim: int) -> Array:
    """A per-channel vector shaped to broadcast against channels-last input without rank promotion."""
    return v.reshape((1,) * (ndim - 1) + (v.shape[-1],))


def conv2d(
    x: Array,
    kernel: Array,
    bias: Array | None,
    stride: int,
    padding: int,
    precision: Any,
    groups: int = 1,
    *,
    matmul_1x1: bool | None = None,
    space_to_depth: bool = False,
) -> Array:
    """torch's Conv2d on NHWC input and an HWIO kernel, symmetric padding ``((p, p), (p, p))``, and a
    per-channel ``bias`` when there is one (x and kernel already in the compute dtype).

    Flax's 'SAME' would pad (0, 1) for stride 2 on even sizes, which shifts every strided layer by
    one pixel. ``groups`` is torch's (XLA's ``feature_group_count``): one grouped convolution, the kernel
    (H, W, in / groups, out). An ungrouped 1x1 convolution without padding runs as a matrix product when
    ``matmul_1x1`` (None: on MATMUL_1X1_BACKENDS); an ungrouped strided convolution as a stride-1 one on a
    space-to-depth input when ``space_to_depth`` (``resnet_flax.levers``: the same function either way).
    """
    if matmul_1x1 is None:
        matmul_1x1 = jax.default_backend() in MATMUL_1X1_BACKENDS
    if kernel.shape[:2] == (1, 1) and padding == 0 and groups == 1 and matmul_1x1:
        y = conv2d_1x1_as_dot(x, kernel, stride, precision)
    elif space_to_depth and stride > 1 and groups == 1:
        y = conv2d_space_to_depth(x, kernel, stride, padding, precision)
    else:
        p = padding
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(stride, stride),
            padding=((p, p), (p, p)),
            dimension_numbers=CONV_DIMENSIONS,
            feature_group_count=groups,
            precision=precision,
        )
    if bias is None:
        return y
    return y + per_channel(bias.astype(y.dtype), y.ndim)


def linear(x: Array, kernel: Array, bias: Array, precision: Any) -> Array:
    """torch's Linear with an (in, out) kernel, torch's weight transposed (all in the compute dtype)."""
    return jnp.dot(x, kernel, precision=precision) + bias.reshape(1, -1)


def max_pool2d(x: Array, kernel_size: int, stride: int, padding: int) -> Array:
    """torch.nn.MaxPool2d on NHWC input: symmetric padding with -inf (never 'SAME')."""
    p = padding
    return jax.lax.reduce_window(
        x,
        -jnp.inf,  # a scalar, so JAX sees a max monoid: reduce_window_max, which it can differentiate
        jax.lax.max,
        (1, kernel_size, kernel_size, 1),
        (1, stride, stride, 1),
        ((0, 0), (p, p), (p, p), (0, 0)),
    )


def avg_pool2d(x: Array, kernel_size: int, stride: int) -> Array:
    """torch.nn.AvgPool2d(kernel_size, stride, ceil_mode=True, count_include_pad=False) on NHWC input.

    Ceil mode adds a last, partial window where the input does not divide evenly (an odd size with
    stride 2); it averages only the elements it covers, so each output is divided by its own count.
    The counts depend only on the shape, so they are constants of the compiled program.
    """
    k, s = kernel_size, stride
    pads, counts = [], []
    for size in x.shape[1:3]:
        out = -(-(size - k) // s) + 1
        if (out - 1) * s >= size:  # torch's rule: the last window starts inside the input
            out -= 1
        starts = np.arange(out) * s
        pads.append((0, (out - 1) * s + k - size))
        counts.append(np.minimum(starts + k, size) - starts)
    total = jax.lax.reduce_window(
        x,
        0.0,  # a Python scalar, so JAX sees an add monoid: reduce_window_sum, which it can differentiate
        jax.lax.add,
        (1, k, k, 1),
        (1, s, s, 1),
        ((0, 0), *pads, (0, 0)),
    )
    count = np.outer(counts[0], counts[1]).reshape(1, *total.shape[1:3], 1)
    return total / jnp.asarray(count, x.dtype)


def identity(x: Array) -> Array:
    """torch.nn.Identity (the average-pool shortcut's place of its pool at stride 1)."""
    return x


def squeeze(x: Array) -> Array:
    """Squeeze-and-excitation's squeeze: each channel's mean over height and width, kept as (N, 1, 1, C)."""
    return jnp.mean(x, axis=(1, 2), keepdims=True)


def excite(x: Array, gate_logits: Array) -> Array:
    """Squeeze-and-excitation's excitation: x's channels scaled by the sigmoid of (N, 1, 1, C) gate logits."""
    return x * jax.nn.sigmoid(gate_logits)


def stats_dtype(param_dtype: Dtype) -> Any:
    """The dtype of BatchNorm's running statistics for parameters of ``param_dtype``."""
    return jnp.promote_types(param_dtype, MIN_STATS_DTYPE)


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


def torch_running_stats(
    mean: Array, var: Array, batch_mean: Array, batch_var: Array, n: int, momentum: float
) -> tuple[Array, Array]:
    """torch's running-statistics update: momentum weighs the new batch, the variance is unbiased (n/(n-1))."""
    unbiased = batch_var * (n / max(n - 1, 1))
    new_mean = (1 - momentum) * mean + momentum * batch_mean
    new_var = (1 - momentum) * var + momentum * unbiased
    return new_mean.astype(mean.dtype), new_var.astype(var.dtype)


def batch_norm2d(
    x: Array,
    scale: Array,
    bias: Array,
    mean: Array,
    var: Array,
    *,
    use_running_average: bool,
    momentum: float,
    epsilon: float,
    dtype: Dtype | None,
    train_norm: TrainNorm,
) -> tuple[Array, tuple[Array, Array] | None]:
    """torch.nn.BatchNorm2d over the last axis: the output in ``dtype`` (x's when None), and in train
    mode the new running ``(mean, var)`` (None in eval mode).

    Statistics are computed in at least float32 (bf16 in, float32 stats; float64 stays float64);
    eval mode normalises with the running statistics, train mode with ``train_norm``'s batch ones.
    """
    compute_dtype = jnp.promote_types(x.dtype, MIN_STATS_DTYPE)
    scale, bias = scale.astype(compute_dtype), bias.astype(compute_dtype)
    if use_running_average:
        y = batch_norm(
            x.astype(compute_dtype), mean.astype(compute_dtype), var.astype(compute_dtype), scale, bias, epsilon
        )
        new_stats = None
    else:
        y, batch_mean, batch_var = train_norm(x, scale, bias, epsilon)
        new_stats = torch_running_stats(mean, var, batch_mean, batch_var, x.size // x.shape[-1], momentum)
    return y.astype(dtype or x.dtype), new_stats
