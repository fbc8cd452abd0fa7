"""Subcommands of resnet-parity: each module has add_parser(subparsers) that sets ``run``."""

from . import summary

COMMANDS = (summary,)
