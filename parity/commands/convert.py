"""resnet-parity convert IN OUT: checkpoints between PyTorch and Flax, files or model-hub directories."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

from resnet_arch import DTYPES, LINEN, dtype_name

from ..conversion.files import FRAMEWORKS, MSGPACK, PICKLE, TORCH, CheckpointError, file_format, write_checkpoint
from ..conversion.hub import OVERWRITE_HINT, WEIGHTS_FILES, write_hub_dir
from ..conversion.load import read_weights
from ..conversion.names import LAYOUTS, SEED
from ..conversion.validate import BAD_VALUES, BAD_VALUES_HINT, ERROR, WARN, ConversionError
from .args import EXIT_BAD_INPUT, framework_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``convert`` and its options."""
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between PyTorch and Flax linen or NNX (.safetensors, .pth/.pt/.bin, .msgpack, "
        "hub directories)",
        description="Convert a ResNet checkpoint between PyTorch and Flax. The architecture and the key layout are "
        "read from the weights; the direction from the file types (.pth/.pt/.bin is PyTorch, .msgpack is Flax, a "
        ".safetensors output takes the other framework than the input, a directory is PyTorch) unless --to says. "
        "A directory, as input, is what transformers' save_pretrained or timm's save_for_hf leaves; as output, "
        "it gets model.safetensors and, for --layout transformers or timm, the config.json their loaders read.",
    )
    p.add_argument("input", type=Path, help="checkpoint file or model directory to read")
    p.add_argument(
        "output",
        type=Path,
        help="file to write (.safetensors recommended, .pth/.pt/.bin, .msgpack) or directory (no suffix)",
    )
    p.add_argument(
        "--to",
        type=framework_arg,
        choices=FRAMEWORKS,
        help="framework of the output (default: from the file types; flax is linen); linen and nnx write the same "
        "Flax file",
    )
    p.add_argument("--layout", choices=LAYOUTS, default=SEED, help="torch key names of a PyTorch output")
    p.add_argument(
        "--param-dtype",
        choices=tuple(DTYPES),
        help="cast the floating-point weights (default: keep each dtype)",
    )
    p.add_argument(
        "--bad-values",
        choices=BAD_VALUES,
        default=ERROR,
        help="NaN/inf weights or a negative/fractional BatchNorm counter: refuse (default) or convert with a warning",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="a directory output that already holds model files (weights, config.json): replace them, and remove "
        "the weight files the new config.json would not describe (default: refuse)",
    )
    p.set_defaults(run=run)


# The Python arguments that library messages name, as this command's flags.
CLI_FLAGS = {OVERWRITE_HINT: "--overwrite", BAD_VALUES_HINT: f"--bad-values {WARN}"}


def _cli_message(error: Exception) -> str:
    """An error's message with the Python arguments it names put as the command line's flags."""
    message = str(error)
    for argument, flag in CLI_FLAGS.items():
        message = message.replace(argument, flag)
    return message


def _is_dir(path: Path) -> bool:
    """A directory output: an existing directory, or a path without a suffix."""
    return path.is_dir() or not path.suffix


def _target_framework(args: argparse.Namespace, source: str) -> str:
    """--to if given, else what the output holds (a directory: torch; a .safetensors file flips the framework)."""
    if args.to:
        return args.to
    if _is_dir(args.output):
        return TORCH
    fmt = file_format(args.output)
    if fmt == PICKLE:
        return TORCH
    if fmt == MSGPACK:
        return LINEN
    return LINEN if source == TORCH else TORCH


def run(args: argparse.Namespace) -> int:
    """Convert args.input into args.output; prints what was converted, returns the exit code."""
    # float64 checkpoints stay float64: the converter refuses to narrow them silently without x64.
    with jax.enable_x64(True):
        return _convert(args)


def _convert(args: argparse.Namespace) -> int:
    param_dtype = dtype_name(args.param_dtype) if args.param_dtype else None
    try:
        weights = read_weights(args.input, bad_values=args.bad_values)
        source = weights.source
        target = _target_framework(args, source)
        meta = {"arch": weights.spec.describe()}
        if target == TORCH and _is_dir(args.output):
            state_dict, size = write_hub_dir(args.output, weights, args.layout, param_dtype, overwrite=args.overwrite)
            arrays = list(state_dict.values())
        elif target == TORCH:
            state_dict = weights.to_torch(args.layout, param_dtype)
            size = write_checkpoint(args.output, state_dict, target, meta)
            arrays = list(state_dict.values())
        elif _is_dir(args.output):
            raise CheckpointError(f"{args.output}: a model directory holds PyTorch weights; write Flax to a file")
        else:
            # linen and nnx: an NNX model's state is this variables tree, so one file serves both APIs.
            variables = weights.to_flax(param_dtype)
            size = write_checkpoint(args.output, variables, LINEN, meta)
            arrays = jax.tree_util.tree_leaves(variables)
    except (CheckpointError, ConversionError) as e:
        print(f"resnet-parity convert: error: {_cli_message(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    layout = f", {args.layout} names" if target == TORCH else ""
    written = f"{args.output}/{WEIGHTS_FILES[0]}" if target == TORCH and _is_dir(args.output) else args.output
    print(f"{args.input} ({source}) -> {written} ({target}{layout})")
    nbytes = sum(a.nbytes for a in arrays)
    print(f"  {weights.spec.describe()}: {len(arrays)} tensors, {nbytes:,} bytes of weights, {size:,} bytes written")
    return 0
