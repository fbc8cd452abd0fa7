"""Argument types shared by the subcommands."""

from __future__ import annotations

import argparse

from ..conversion.files import FRAMEWORK_ALIASES

# The exit status of a command that could not do its job for bad input (flags, files, a place it cannot
# write), as argparse exits on usage errors.
EXIT_BAD_INPUT = 2


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1, with a message that says so."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def framework_arg(text: str) -> str:
    """argparse type: a framework's name, an alias read as the name it stands for ("flax" is "linen").

    ``choices=FRAMEWORKS`` then refuses any other name, listing the choices.
    """
    return FRAMEWORK_ALIASES.get(text, text)
