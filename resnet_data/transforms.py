"""The ImageNet ResNet-50 transforms on PIL images, in uint8, as torchvision defines them.

Training: RandomResizedCrop (area 8%-100% of the image, aspect ratio 3/4-4/3, bilinear) and a
horizontal flip with probability 1/2. Evaluation: resize the shorter side to 256 and cut the
centre 224 (for other sizes, the same 7/8 ratio). Each function does what the torchvision
transform of the same name does to a PIL image, pixel for pixel; only the random numbers come
from a numpy Generator (Grain's per-example one) instead of torch's global generator.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .images import MAX_PIXELS, UnreadableImageError

# ImageNet's channel mean and standard deviation in 0..1 units (torchvision's): what the recipe
# normalises with, on the device, instead of statistics of the training images.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's RandomResizedCrop defaults, those of the ImageNet recipe.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
# Boxes drawn before falling back to a centre crop, as torchvision does.
CROP_TRIES = 10
# Evaluation keeps the centre 224 of a 256 resize: the crop is 7/8 of the resized shorter side.
EVAL_CROP_FRACTION = 224 / 256
# torchvision's default interpolation; PIL's bilinear filter always antialiases when shrinking.
RESAMPLE = Image.Resampling.BILINEAR

Box = tuple[int, int, int, int]  # top, left, height, width, as torchvision's get_params returns them


def random_resized_crop_box(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> Box:
    """torchvision's RandomResizedCrop.get_params: a box of random area and log-uniform aspect ratio
    that fits the image, else (after CROP_TRIES draws) the largest centred box within the ratio range."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_TRIES):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: Image.Image, box: Box, size: int) -> Image.Image:
    """torchvision's F.resized_crop on a PIL image: cut the box, then resize it to size x size."""
    top, left, h, w = box
    return image.crop((left, top, left + w, top + h)).resize((size, size), RESAMPLE)


def train_crop(image: Image.Image, rng: np.random.Generator, size: int, flip: bool) -> np.ndarray:
    """RandomResizedCrop(size) then (when flip) RandomHorizontalFlip, as a (size, size, 3) uint8 array."""
    out = np.asarray(resized_crop(image, random_resized_crop_box(rng, *image.size), size))
    if flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return out


def resize_shorter(image: Image.Image, side: int, resample: int = RESAMPLE) -> Image.Image:
    """torchvision's Resize(side): the shorter side becomes side, the longer keeps the aspect ratio (truncated);
    ``resample`` is the PIL filter (an ``Image.Resampling`` code)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(side * long / short)
    new_size = (side, new_long) if width <= height else (new_long, side)
    if new_size[0] * new_size[1] > MAX_PIXELS:  # a thin strip of an image grows by side / short in both ways
        raise UnreadableImageError(
            f"{width}x{height} image resized to {new_size[0]}x{new_size[1]} would have "
            f"{new_size[0] * new_size[1]:,} pixels, more than the {MAX_PIXELS:,} an image may have"
        )
    return image if new_size == image.size else image.resize(new_size, resample)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's CenterCrop(size) for an image at least size x size (offsets rounded as it does)."""
    width, height = image.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def eval_resize_side(size: int) -> int:
    """The shorter side evaluation resizes to before the centre crop: 256 for 224."""
    return int(round(size / EVAL_CROP_FRACTION))


def eval_crop(image: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to eval_resize_side(size), cut the centre size x size: a uint8 array."""
    return np.asarray(center_crop(resize_shorter(image, eval_resize_side(size)), size))
