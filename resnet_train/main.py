"""`resnet-train`: train the Flax ResNet with optax, export it to PyTorch, print a JSON summary."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence

from .config import parse_args
from .export import ExportMismatchError
from .loop import NonFiniteLossError, fit


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, train, and print the summary as the last line of stdout; returns the exit code."""
    config = parse_args(argv)
    # Our messages at INFO; orbax and absl log every save step at INFO, so other loggers stay at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=True)
    logging.getLogger("resnet_train").setLevel(logging.INFO)
    try:
        result = fit(config)
    except (NonFiniteLossError, ExportMismatchError) as e:
        print(f"resnet-train: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"resnet-train: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
