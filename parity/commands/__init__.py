"""Subcommands of resnet-parity: each module has add_parser(subparsers) that sets ``run``."""

from . import check, convert, export, predict, summary

COMMANDS = (summary, convert, check, export, predict)
