"""On-device augmentation inside the jitted train step: random crop and flip of uint8 NHWC images."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def random_crop(key: Array, images_nhwc: Array, padding: int) -> Array:
    """Zero-pad each side by `padding` and cut a random crop of the original size, per image."""
    n, h, w, c = images_nhwc.shape
    padded = jnp.pad(images_nhwc, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)

    def crop(image: Array, offset: Array) -> Array:
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets)


def random_flip(key: Array, images_nhwc: Array) -> Array:
    """Mirror each image left-right with probability 1/2."""
    n = images_nhwc.shape[0]
    flip = jax.random.bernoulli(key, 0.5, (n,)).reshape(n, 1, 1, 1)
    return jnp.where(flip, images_nhwc[:, :, ::-1, :], images_nhwc)


def augment(key: Array, images_nhwc: Array, crop_padding: int, flip: bool) -> Array:
    """Random crop (when crop_padding > 0) then random flip (when flip), each with its own key."""
    crop_key, flip_key = jax.random.split(key)
    if crop_padding:
        images_nhwc = random_crop(crop_key, images_nhwc, crop_padding)
    if flip:
        images_nhwc = random_flip(flip_key, images_nhwc)
    return images_nhwc
