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


def _moments(x: Array, dtype: Any, two_pass: bool) -> tuple[Array, Array]:
    """Per-channel mean and biased variance: from one pass (sum and sum of squares together), or from
    two (the mean, then the mean of squared deviations from it) with ``two_pass``.

    One pass takes the sums about a shift (the first pixel of the first image): the variance does not
    change, and E[d^2] - E[d]^2 then cancels only as much as the spread of the data, so inputs
    whose mean is far from zero keep most of their precision. Two passes read the input once more
    and cancel nothing: float32's rounding of the deviations, not of their squares' difference.
    """
    xf = x.astype(dtype)
    if two_pass:
        mean = jnp.mean(xf, _axes(x))
        return mean, jnp.mean(jnp.square(xf - per_channel(mean, x.ndim)), _axes(x))
    shift = jax.lax.stop_gradient(xf[(0,) * (x.ndim - 1)])
    d = xf - per_channel(shift, x.ndim)
    n = _count(x)
    mean_d = jnp.sum(d, _axes(x)) / n
    var = jnp.maximum(jnp.sum(jnp.square(d), _axes(x)) / n - jnp.square(mean_d), 0)
    return mean_d + shift, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused_train(x: Array, scale: Array, bias: Array, epsilon: float, two_pass: bool) -> tuple[Array, Array, Array]:
    return _forward(x, scale, bias, epsilon, two_pass)[0]


def fused_batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float) -> tuple[Array, Array, Array]:
    """``ops.batch_norm_train`` with a one-pass variance and a closed-form backward pass."""
    return _fused_train(x, scale, bias, epsilon, False)


def fused_batch_norm_train_two_pass(x: Array, scale: Array, bias: Array, epsilon: float) -> tuple[Array, Array, Array]:
    """``fused_batch_norm_train`` with the variance in two passes (float32 accuracy for one more read)."""
    return _fused_train(x, scale, bias, epsilon, True)


def _forward(
    x: Array, scale: Array, bias: Array, epsilon: float, two_pass: bool
) -> tuple[tuple[Array, Array, Array], tuple[Array, ...]]:
    mean, var = _moments(x, scale.dtype, two_pass)
    out = batch_norm(x.astype(scale.dtype), mean, var, scale, bias, epsilon)
    return (out, mean, var), (x, mean, jax.lax.rsqrt(var + epsilon), scale)


def _backward(
    epsilon: float, two_pass: bool, residuals: tuple[Array, ...], cotangents: tuple[Array, Array, Array]
) -> tuple[Array, Array, Array]:
    """Gradients for x, scale and bias. With xhat = (x - mean) / std and dy the output's cotangent:

    dbias = sum(dy), dscale = sum(dy * xhat),
    dx = scale / std * (dy - (dbias + xhat * dscale) / n) + (dmean + 2 * dvar * (x - mean)) / n,
    where dmean and dvar are the cotangents of the returned statistics (zero in a loss that only
    uses the output; the running statistics carry no gradient).
    """
    del epsilon, two_pass  # 1/std is saved; the gradient is the same for either variance
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


_fused_train.defvjp(_forward, _backward)

# The fused train-mode normalisations: one-pass variance, and two-pass.
FUSED_TRAIN_NORMS = (fused_batch_norm_train, fused_batch_norm_train_two_pass)

# The BatchNorm layer kinds of a fused ResNet: BatchNorm2d whose train mode is fused; eval mode and
# variables unchanged.
fused_batch_norm2d = functools.partial(BatchNorm2d, train_norm=fused_batch_norm_train)
fused_batch_norm2d_two_pass = functools.partial(BatchNorm2d, train_norm=fused_batch_norm_train_two_pass)


def fused(model: ResNet, *, two_pass: bool = False) -> ResNet:
    """``model`` (every option kept) with the fused train-mode BatchNorm (its variance in two passes with
    ``two_pass``); its variables apply as they are."""
    check_unfolded(model, "fused")
    if model.norm not in (BatchNorm2d, fused_batch_norm2d, fused_batch_norm2d_two_pass):
        kind = getattr(model.norm, "__name__", repr(model.norm))
        raise TypeError(f"fused expects a resnet_flax.ResNet with BatchNorm2d layers, got one with {kind}")
    return model.clone(norm=fused_batch_norm2d_two_pass if two_pass else fused_batch_norm2d)


def is_fused(model: ResNet) -> bool:
    """Whether the model's train-mode BatchNorm is a fused one."""
    return model.norm in (fused_batch_norm2d, fused_batch_norm2d_two_pass)
