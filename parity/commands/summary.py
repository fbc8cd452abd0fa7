"""resnet-parity summary: the model shown three ways, as in the seed's section 8."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="show a model: layer table, modules or named parameters")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError
