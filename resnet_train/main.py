"""`resnet-train`: train the Flax ResNet with optax, export it to PyTorch, print a JSON summary."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TextIO

from .config import parse_args
from .export import ExportMismatchError
from .loop import NonFiniteLossError, fit


@contextlib.contextmanager
def stdout_for_json_only() -> Iterator[TextIO]:
    """While inside, file descriptor 1 points at stderr, so whatever libraries print there (gloo's
    connection lines come from C++) lands on stderr; yields the real stdout for the JSON line."""
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    try:
        with os.fdopen(os.dup(real), "w") as out:
            yield out
    finally:
        sys.stdout.flush()
        os.dup2(real, 1)
        os.close(real)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, train, and print the summary as the last line of stdout; returns the exit code."""
    config = parse_args(argv)
    # Our messages at INFO; orbax and absl log every save step at INFO, so other loggers stay at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=True)
    logging.getLogger("resnet_train").setLevel(logging.INFO)
    with stdout_for_json_only() as stdout:
        try:
            result = fit(config)
        except (NonFiniteLossError, ExportMismatchError) as e:
            print(f"resnet-train: {e}", file=sys.stderr)
            return 1
        except (ValueError, FileNotFoundError) as e:
            print(f"resnet-train: error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(result, sort_keys=True), file=stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
