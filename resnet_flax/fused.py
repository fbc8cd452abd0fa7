"""Train-mode BatchNorm with fewer passes over memory: one read for the statistics and a
hand-written backward pass. Same function, same gradient, same variables.

JAX's derivative of the two-pass BatchNorm in ``ops.batch_norm_train`` reduces over every
activation several times and may keep float32 intermediates for the backward pass. The fused
version reads its input once for the sum and the sum of squares, keeps only its input (in the
compute dtype, bf16 under mixed precision), the mean and 1/std, and computes the gradient in
closed form. ``fused(model)`` is ``model`` with its BatchNorm layer kind swapped for it: the same
module tree, parameters and checkpoints, so a model trains fused and exports, converts and folds
as any ResNet.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from .fold import check_unfolded
from .layers import BatchNorm2d
from .model import ResNet
from .ops import batch_norm, per_channel

Array = jax.Array


def _axes(x: Array) -> tuple[int, ...]:
    return tuple(range(x.ndim - 1))


def _count(x: Array) -> int:
    return x.size // x.shape[-1]


def _moments(x: Array, dtype: Any) -> tuple[Array, Array]:
    """Per-channel mean and biased variance from one pass (sum and sum of squares together).

    The sums are taken about a shift (the first pixel of the first image): the variance does not
    change, and E[d^2] - E[d]^2 then cancels only as much as the spread of the data, so inputs
    whose mean is far from zero keep their precision.
    """
    xf = x.astype(dtype)
    shift = jax.lax.stop_gradient(xf[(0,) * (x.ndim - 1)])
    d = xf - per_channel(shift, x.ndim)
    n = _count(x)
    mean_d = jnp.sum(d, _axes(x)) / n
    var = jnp.maximum(jnp.sum(jnp.square(d), _axes(x)) / n - jnp.square(mean_d), 0)
    return mean_d + shift, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fused_batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float) -> tuple[Array, Array, Array]:
    """``ops.batch_norm_train`` with a one-pass variance and a closed-form backward pass."""
    return _forward(x, scale, bias, epsilon)[0]


def _forward(
    x: Array, scale: Array, bias: Array, epsilon: float
) -> tuple[tuple[Array, Array, Array], tuple[Array, ...]]:
    mean, var = _moments(x, scale.dtype)
    out = batch_norm(x.astype(scale.dtype), mean, var, scale, bias, epsilon)
    return (out, mean, var), (x, mean, jax.lax.rsqrt(var + epsilon), scale)


def _backward(
    epsilon: float, residuals: tuple[Array, ...], cotangents: tuple[Array, Array, Array]
) -> tuple[Array, Array, Array]:
    """Gradients for x, scale and bias. With xhat = (x - mean) / std and dy the output's cotangent:

    dbias = sum(dy), dscale = sum(dy * xhat),
    dx = scale / std * (dy - (dbias + xhat * dscale) / n) + (dmean + 2 * dvar * (x - mean)) / n,
    where dmean and dvar are the cotangents of the returned statistics (zero in a loss that only
    uses the output; the running statistics carry no gradient).
    """
    del epsilon  # 1/std is saved
    x, mean, rstd, scale = residuals
    dy, dmean, dvar = cotangents
    nd, n = x.ndim, _count(x)
    xhat = (x.astype(mean.dtype) - per_channel(mean, nd)) * per_channel(rstd, nd)
    dy = dy.astype(mean.dtype)
    dbias = jnp.sum(dy, _axes(x))
    dscale = jnp.sum(dy * xhat, _axes(x))
    dx = per_channel(scale * rstd, nd) * (dy - (per_channel(dbias, nd) + xhat * per_channel(dscale, nd)) / n)
    dx = dx + (per_channel(dmean, nd) + xhat * per_channel(2 * dvar / rstd, nd)) / n
    return dx.astype(x.dtype), dscale, dbias


fused_batch_norm_train.defvjp(_forward, _backward)


# The BatchNorm layer kind of a fused ResNet: BatchNorm2d whose train mode is fused_batch_norm_train;
# eval mode and variables unchanged.
fused_batch_norm2d = functools.partial(BatchNorm2d, train_norm=fused_batch_norm_train)


def fused(model: ResNet) -> ResNet:
    """``model`` (every option kept) with the fused train-mode BatchNorm; its variables apply as they are."""
    check_unfolded(model, "fused")
    if model.norm not in (BatchNorm2d, fused_batch_norm2d):
        kind = getattr(model.norm, "__name__", repr(model.norm))
        raise TypeError(f"fused expects a resnet_flax.ResNet with BatchNorm2d layers, got one with {kind}")
    return model.clone(norm=fused_batch_norm2d)


def is_fused(model: ResNet) -> bool:
    """Whether the model's train-mode BatchNorm is the fused one."""
    return model.norm is fused_batch_norm2d
