"""resnet-parity convert IN OUT: checkpoint files between PyTorch and Flax, either direction."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

from resnet_arch import DTYPES, dtype_name

from ..convert import ConversionError, arch_of, check_flax_variables, flax_to_torch, torch_to_flax
from ..files import (
    FLAX,
    FRAMEWORKS,
    MSGPACK,
    NNX,
    PICKLE,
    TORCH,
    CheckpointError,
    file_format,
    read_checkpoint,
    write_checkpoint,
)
from ..names import LAYOUTS, SEED
from ..nnx import linen_to_nnx


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``convert`` and its options."""
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between PyTorch and Flax, linen or NNX (.safetensors, .pth/.pt, .msgpack)",
        description="Convert a ResNet checkpoint between PyTorch and Flax. The architecture is read from the "
        "file; the direction from the file types (.pth/.pt is PyTorch, .msgpack is Flax, a .safetensors "
        "output takes the other framework than the input) unless --to says.",
    )
    p.add_argument("input", type=Path, help="checkpoint to read")
    p.add_argument("output", type=Path, help="file to write: .safetensors (recommended), .pth/.pt or .msgpack")
    p.add_argument("--to", choices=FRAMEWORKS, help="framework of the output (default: from the file types)")
    p.add_argument("--layout", choices=LAYOUTS, default=SEED, help="torch key names of a PyTorch output")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="cast floating-point tensors (default: keep each dtype)")
    p.set_defaults(run=run)


def _target_framework(args: argparse.Namespace, source: str) -> str:
    """--to if given, else what the output suffix holds (a .safetensors output flips the framework)."""
    if args.to:
        return args.to
    fmt = file_format(args.output)
    if fmt == PICKLE:
        return TORCH
    if fmt == MSGPACK:
        return FLAX
    return FLAX if source == TORCH else TORCH


def run(args: argparse.Namespace) -> int:
    """Convert args.input into args.output; prints what was converted, returns the exit code."""
    # float64 checkpoints stay float64: the converter refuses to narrow them silently without x64.
    with jax.enable_x64(True):
        return _convert(args)


def _convert(args: argparse.Namespace) -> int:
    dtype = dtype_name(args.dtype) if args.dtype else None
    try:
        ckpt = read_checkpoint(args.input)
        target = _target_framework(args, ckpt.framework)
        if ckpt.framework == TORCH:
            variables = torch_to_flax(ckpt.tensors, dtype=dtype)
        else:
            _, variables = check_flax_variables(ckpt.tensors)
            if dtype and target != TORCH:
                variables = torch_to_flax(flax_to_torch(variables), dtype=dtype)
        if target == TORCH:
            out = flax_to_torch(variables, layout=args.layout, dtype=dtype)
            tensors, nbytes = len(out), sum(t.nbytes for t in out.values())
        else:
            out = variables
            leaves = jax.tree_util.tree_leaves(out)
            tensors, nbytes = len(leaves), sum(leaf.nbytes for leaf in leaves)
        spec = arch_of(out)
        # --to nnx writes through the NNX model (so the output is known to load into it); its state is the
        # Flax variables tree.
        size = write_checkpoint(
            args.output, linen_to_nnx(out) if target == NNX else out, target, {"arch": spec.describe()}
        )
    except (CheckpointError, ConversionError) as e:
        print(f"resnet-parity convert: error: {e}", file=sys.stderr)
        return 2
    layout = f", {args.layout} names" if target == TORCH else ""
    print(f"{args.input} ({ckpt.framework}) -> {args.output} ({target}{layout})")
    print(f"  {spec.describe()}: {tensors} tensors, {nbytes:,} bytes of weights, file {size:,} bytes")
    return 0
