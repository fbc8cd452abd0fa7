"""One image file -> an RGB PIL image, whatever its mode; unreadable files and decompression bombs refused.

Only regular files are read (a FIFO or a device would block a worker forever), and a read that does
not finish within ``READ_TIMEOUT_S`` (a hung network mount) is given up, the file counted as unreadable.
"""

from __future__ import annotations

import io
import os
import stat
import threading

import numpy as np
from PIL import Image

# PIL's own default limit (MAX_IMAGE_PIXELS: a quarter GiB of 3-byte pixels, about 89.5 million);
# a larger image is refused as a possible decompression bomb, whatever PIL is set to.
MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3
# Modes PIL opens 16-bit grey PNGs in: their 0..65535 values are scaled to 0..255 (PIL's own
# conversion to RGB clips them at 255, which turns almost every pixel white).
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# 65535 / 255: one 8-bit step in 16-bit units.
WIDE_STEP = 257
# What PIL raises on a file that is not a readable image (truncated, corrupt, wrong format).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError)
# Seconds one file's read may take before it is skipped as unreadable; a local disk reads an image in
# milliseconds, so only a stalled source (a hung network mount) reaches it.
READ_TIMEOUT_S = 30.0


class UnreadableImageError(ValueError):
    """A file that cannot be used as an image: corrupt, truncated, not an image, or too large to decode safely."""


def _scaled_grey(image: Image.Image) -> Image.Image:
    """A 16-bit grey image as 8-bit RGB, rounding x / 257."""
    wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
    grey = ((wide + WIDE_STEP // 2) // WIDE_STEP).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as RGB: grey, CMYK, palette and alpha as PIL converts them (alpha dropped, as
    torchvision's loader does); 16-bit grey scaled; palette transparency through RGBA, as PIL advises."""
    if image.mode in WIDE_GREY_MODES:
        return _scaled_grey(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def _read_regular(path: str | os.PathLike, timeout: float) -> bytes:
    """The bytes of a regular file, or UnreadableImageError: something else, or a read past the timeout.

    The file is opened without blocking (a FIFO's open would wait for a writer) and checked through
    the open descriptor, so a file swapped for a FIFO after a check is still caught. The read runs on
    a daemon thread that is abandoned, not waited for, when it stalls.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnreadableImageError(f"{path}: not a regular file (a FIFO, device or socket); skipped")
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    result: list[bytes | BaseException] = []

    def read() -> None:
        with f:
            try:
                result.append(f.read())
            except OSError as e:
                result.append(e)

    reader = threading.Thread(target=read, name=f"read {path}", daemon=True)
    reader.start()
    reader.join(timeout)
    if not result:
        raise UnreadableImageError(f"{path}: reading took more than {timeout:g} s (a stalled file system?); skipped")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def read_rgb(path: str | os.PathLike, timeout: float = READ_TIMEOUT_S) -> Image.Image:
    """Decode one JPEG/PNG regular file (any size and mode) to an RGB image, or raise UnreadableImageError."""
    try:
        with Image.open(io.BytesIO(_read_regular(path, timeout))) as image:
            pixels = image.width * image.height
            if pixels > MAX_PIXELS:
                raise UnreadableImageError(
                    f"{path}: {image.width}x{image.height} is {pixels:,} pixels, more than the {MAX_PIXELS:,} "
                    "an image may have before it is refused as a possible decompression bomb"
                )
            image.load()
            return to_rgb(image)
    except UnreadableImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning: when warnings are errors
        raise UnreadableImageError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except DECODE_ERRORS as e:
        raise UnreadableImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
