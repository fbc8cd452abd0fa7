"""Input normalisation on the device: uint8 NHWC images -> the float input the model expects."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


def normalize(images_nhwc_u8: Array, mean: Sequence[float], std: Sequence[float]) -> Array:
    """uint8 NHWC -> float32 (x / 255 - mean) / std per channel."""
    c = images_nhwc_u8.shape[-1]
    x = images_nhwc_u8.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32).reshape(1, 1, 1, c)) / jnp.asarray(std, jnp.float32).reshape(1, 1, 1, c)
