"""resnet-parity summary: the model shown the seed tutorial's three ways (docs/design.md)."""

from __future__ import annotations

import argparse

import torch
from flax import nnx

import resnet_flax
import resnet_torch
from resnet_arch import ARCH_NAMES, LINEN, NNX
from resnet_flax import nnx as flax_nnx
from resnet_flax import nnx_show
from resnet_flax import show as flax_show
from resnet_torch import show as torch_show

from ..conversion.files import FRAMEWORKS, TORCH
from .args import framework_arg, positive_int

# The seed's three ways: summary() table, model.modules(), model.named_parameters().
SHOWS = ("table", "modules", "parameters")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "summary",
        help="show a model: layer table, modules or named parameters",
        description="Show a ResNet as the seed does: a layer table with output shapes and parameter "
        "counts, its modules, or its named parameters. Nothing is computed: torch runs on the meta "
        "device, Flax (linen and NNX) under jax.eval_shape.",
    )
    p.add_argument(
        "--arch", choices=ARCH_NAMES, default="resnet50", help="depth or family builder name (default: resnet50)"
    )
    p.add_argument(
        "--framework",
        type=framework_arg,
        choices=FRAMEWORKS,
        default=TORCH,
        help="which side to show (default: torch; flax is linen)",
    )
    p.add_argument("--show", choices=SHOWS, default="table", help="what to show (default: table)")
    p.add_argument("--num-classes", type=positive_int, default=10, help="classifier outputs (default: 10, the seed's)")
    p.add_argument("--small-stem", action="store_true", help="3x3/1 stem without max-pool, for 32x32 images")
    p.add_argument(
        "--input-size",
        nargs=2,
        type=positive_int,
        default=(224, 224),
        metavar=("H", "W"),
        help="image height and width for the table's shapes (default: 224 224)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the chosen view of the chosen model; returns 0."""
    options = dict(num_classes=args.num_classes, small_stem=args.small_stem)
    input_hw = tuple(args.input_size)
    view = {TORCH: _torch_view, LINEN: _linen_view, NNX: _nnx_view}[args.framework]
    print(view(args.arch, options, args.show, input_hw))
    return 0


def _torch_view(arch: str, options: dict, show: str, input_hw: tuple[int, int]) -> str:
    # Meta tensors carry shapes only: the table's forward pass costs nothing.
    with torch.device("meta"):
        model = resnet_torch.build(arch, **options)
    if show == "table":
        return torch_show.layer_table(model, input_hw)
    return torch_show.module_list(model) if show == "modules" else torch_show.parameter_list(model)


def _linen_view(arch: str, options: dict, show: str, input_hw: tuple[int, int]) -> str:
    model = resnet_flax.build(arch, **options)
    if show == "table":
        return flax_show.layer_table(model, input_hw)
    return flax_show.module_list(model, input_hw) if show == "modules" else flax_show.parameter_list(model, input_hw)


def _nnx_view(arch: str, options: dict, show: str, input_hw: tuple[int, int]) -> str:
    # Built abstractly: the variables are shapes, no weights are drawn.
    model = nnx.eval_shape(lambda: flax_nnx.build(arch, **options, rngs=nnx.Rngs(0)))
    if show == "table":
        return nnx_show.layer_table(model, input_hw)
    return nnx_show.module_list(model) if show == "modules" else nnx_show.parameter_list(model)
