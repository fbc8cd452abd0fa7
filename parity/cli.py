"""The resnet-parity command: one subcommand per job, each defined in parity.commands."""

from __future__ import annotations

import argparse
import sys

from .commands import COMMANDS


def main(argv: list[str] | None = None) -> int:
    """Parse argv and run the chosen subcommand; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="resnet-parity",
        description="One ResNet in PyTorch and Flax: convert weights, prove parity, show the model.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
