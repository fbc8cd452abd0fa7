"""Subcommands of resnet-parity: each module has add_parser(subparsers) that sets ``run``."""

from . import check, convert, export, summary

COMMANDS = (summary, convert, check, export)
