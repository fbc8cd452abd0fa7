"""Speed levers: other programs for the same function, each behind a model option that is off by default.

- ``max_pool2d_argmax_grad``: max-pooling whose backward pass sends each window's cotangent to the
  window's first maximum through a saved argmax index (one byte per output), instead of XLA's
  select-and-scatter, which re-reads the input and compares every window again;
- ``conv2d_space_to_depth``: a strided convolution (the 7x7/2 stem) as a stride-1 convolution with a
  ceil(k/s)-tap kernel on an s x s-blocked input, so the convolution reads s*s*C channels per pixel
  instead of C with a stride (3 input channels waste most of a GPU's convolution tile);
- ``conv2d_1x1_as_dot``: a 1x1 convolution as a matrix product over the channel axis (a strided slice
  first when strided), which XLA can fuse the producing BatchNorm-apply and ReLU into.

Each computes what ``resnet_flax.ops`` computes the plain way (tests/test_levers.py, float64 to 1e-10).
The kernel a space-to-depth convolution takes is the ordinary HWIO one: it is reorganised inside the
computation, so variables, conversion and checkpoints are the same with or without a lever.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from resnet_arch import DEFAULT_STEM

Array = jax.Array
# The argmax index's dtype: a pooling window has at most 256 positions (the ResNet stem's has 9).
ARGMAX_DTYPE = jnp.uint8
# The dimension numbers the levers' convolutions use (Flax's channels-last layout, as ops.CONV_DIMENSIONS).
NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


# ---------------------------------------------------------------- max-pool with an argmax backward


def _window_views(xp: Array, kernel_size: int, stride: int, out_hw: tuple[int, int]) -> list[Array]:
    """The strided views of padded input ``xp``, one per window position, in row-major window order:
    view (i, j)[n, h, w, c] = xp[n, stride*h + i, stride*w + j, c]."""
    ho, wo = out_hw
    return [
        jax.lax.slice(
            xp,
            (0, i, j, 0),
            (xp.shape[0], i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, xp.shape[3]),
            (1, stride, stride, 1),
        )
        for i in range(kernel_size)
        for j in range(kernel_size)
    ]


def _pool_geometry(x: Array, kernel_size: int, stride: int, padding: int) -> tuple[int, int]:
    h, w = x.shape[1] + 2 * padding, x.shape[2] + 2 * padding
    return (h - kernel_size) // stride + 1, (w - kernel_size) // stride + 1


def _pad_neg_inf(x: Array, padding: int) -> Array:
    p = padding
    return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool2d_argmax_grad(x: Array, kernel_size: int, stride: int, padding: int) -> Array:
    """``ops.max_pool2d`` (torch's MaxPool2d on NHWC input, -inf padding) whose gradient goes to each
    window's first maximum in row-major order, as JAX's derivative of the plain max-pool sends it."""
    return _pool_forward(x, kernel_size, stride, padding)[0]


def _pool_forward(x: Array, kernel_size: int, stride: int, padding: int) -> tuple[Array, tuple[Array, Any]]:
    """The maxima and, per output, the window position of the first maximum (ties keep the earlier)."""
    if kernel_size * kernel_size > jnp.iinfo(ARGMAX_DTYPE).max + 1:
        raise ValueError(f"max_pool2d_argmax_grad: a {kernel_size}x{kernel_size} window has over 256 positions")
    out_hw = _pool_geometry(x, kernel_size, stride, padding)
    views = _window_views(_pad_neg_inf(x, padding), kernel_size, stride, out_hw)
    best, index = views[0], jnp.zeros(views[0].shape, ARGMAX_DTYPE)
    for k, view in enumerate(views[1:], start=1):
        index = jnp.where(view > best, jnp.asarray(k, ARGMAX_DTYPE), index)
        best = jnp.maximum(best, view)  # propagates NaN as reduce_window's max does
    # A size-0 array carries the input's height, width and dtype to the backward pass (residuals are arrays).
    return best, (index, jnp.zeros((0, x.shape[1], x.shape[2], 0), x.dtype))


def _pool_backward(kernel_size: int, stride: int, padding: int, residuals: Any, g: Array) -> tuple[Array]:
    """Each output's cotangent added at its argmax: per window position, the cotangents whose argmax it is,
    spread to input positions by an interior-padded ``lax.pad`` (a strided placement, not a scatter)."""
    index, like_x = residuals
    _, h, w, _ = like_x.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    n, ho, wo, c = g.shape
    zero = jnp.zeros((), g.dtype)
    dxp = jnp.zeros((n, hp, wp, c), g.dtype)
    for k in range(kernel_size * kernel_size):
        i, j = divmod(k, kernel_size)
        picked = jnp.where(index == k, g, zero)
        config = (
            (0, 0, 0),
            (i, hp - i - stride * (ho - 1) - 1, stride - 1),
            (j, wp - j - stride * (wo - 1) - 1, stride - 1),
            (0, 0, 0),
        )
        dxp = dxp + jax.lax.pad(picked, zero, config)
    return (dxp[:, padding : padding + h, padding : padding + w, :].astype(like_x.dtype),)


max_pool2d_argmax_grad.defvjp(_pool_forward, _pool_backward)


# ---------------------------------------------------------------- space-to-depth convolution


def space_to_depth(x: Array, block: int) -> Array:
    """NHWC (N, H, W, C) with H and W multiples of ``block`` -> (N, H/b, W/b, b*b*C), channels ordered
    (row in block, column in block, channel)."""
    n, h, w, c = x.shape
    b = block
    x = x.reshape(n, h // b, b, w // b, b, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h // b, w // b, b * b * c)


def blocked_kernel(kernel: Array, block: int) -> Array:
    """An HWIO (k, k, C, O) kernel -> the (ceil(k/b), ceil(k/b), b*b*C, O) kernel that applies it to
    ``space_to_depth(x, b)`` with stride 1: zero rows and columns pad k to a multiple of b."""
    k, _, c, o = kernel.shape
    kb = math.ceil(k / block)
    pad = kb * block - k
    kernel = jnp.pad(kernel, ((0, pad), (0, pad), (0, 0), (0, 0)))
    kernel = kernel.reshape(kb, block, kb, block, c, o).transpose(0, 2, 1, 3, 4, 5)
    return kernel.reshape(kb, kb, block * block * c, o)


def conv2d_space_to_depth(x: Array, kernel: Array, stride: int, padding: int, precision: Any) -> Array:
    """A square k x k convolution with ``stride`` and symmetric ``padding`` on NHWC input (HWIO kernel),
    computed as a stride-1 convolution of ``blocked_kernel`` over ``space_to_depth`` of the padded input.

    Output o reads padded rows stride*o + i for i < k; with i = stride*a + r that is block o + a, row r
    of the blocked input, so a ceil(k/stride)-tap convolution over blocks computes it. The input is
    padded (or cut) at the end to whole blocks covering every tap; added rows meet only the kernel's zeros.
    """
    k = kernel.shape[0]
    kb = math.ceil(k / stride)
    out_h = (x.shape[1] + 2 * padding - k) // stride + 1
    out_w = (x.shape[2] + 2 * padding - k) // stride + 1
    rows, cols = stride * (out_h + kb - 1), stride * (out_w + kb - 1)
    p = padding
    xp = jnp.pad(x, ((0, 0), (p, max(rows - x.shape[1] - p, 0)), (p, max(cols - x.shape[2] - p, 0)), (0, 0)))
    xp = xp[:, :rows, :cols, :]  # rows past the last tap, when the padded input has them
    return jax.lax.conv_general_dilated(
        space_to_depth(xp, stride),
        blocked_kernel(kernel, stride),
        window_strides=(1, 1),
        padding="VALID",
        dimension_numbers=NHWC_HWIO,
        precision=precision,
    )


# ---------------------------------------------------------------- 1x1 convolutions as matrix products


def conv2d_1x1_as_dot(x: Array, kernel: Array, stride: int, precision: Any) -> Array:
    """A 1x1 convolution without padding on NHWC input: a strided slice when ``stride`` > 1, then a
    matrix product of the channel axis with the (C, O) kernel."""
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    return jax.lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())), precision=precision)


def check_stem_levers(*, stem: str, small_stem: bool, space_to_depth_stem: bool, max_pool_argmax_grad: bool) -> None:
    """ValueError when a stem lever is asked of a stem it does not apply to (instead of doing nothing):
    ``space_to_depth_stem`` rewrites the 7x7/2 convolution, ``max_pool_argmax_grad`` the stem's max-pool."""
    if space_to_depth_stem and (small_stem or stem != DEFAULT_STEM):
        raise ValueError(
            "space_to_depth_stem applies to the default 7x7/2 stem convolution; this model has "
            f"{'the small (3x3/1) stem' if small_stem else f'the {stem} stem'} (use small_stem=False, stem='default')"
        )
    if max_pool_argmax_grad and small_stem:
        raise ValueError(
            "max_pool_argmax_grad applies to the stem's max-pool; the small stem (3x3/1) has none "
            "(use small_stem=False)"
        )
