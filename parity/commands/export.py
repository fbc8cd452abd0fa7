"""resnet-parity export MODEL OUT: a model for serving, as ONNX or a serialized JAX program, verified on write."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..conversion.convert import ConversionError
from ..conversion.files import CheckpointError
from ..export import FORMAT_DTYPES, FORMATS, FP32, ExportError, export, format_of
from .args import EXIT_BAD_INPUT, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``export`` and its options."""
    p = sub.add_parser(
        "export",
        help="write a model for serving: ONNX (onnxruntime, TensorRT) or a serialized JAX program (StableHLO)",
        description="Write MODEL for serving and check it before it is in place: the artifact runs on a fixed batch "
        "and its logits must equal the float32 Flax model's within the tolerance (1e-5 for fp32), else nothing is "
        "written. Input: images as x / 255 normalised by the recorded mean and std (the model's own, else "
        "ImageNet's), any batch size. ONNX takes NCHW float32 (as PyTorch), StableHLO NHWC float32 (as Flax); "
        "both output float32 logits. Class names and normalisation go into the ONNX metadata, or into OUT.json "
        "beside the StableHLO file.",
    )
    p.add_argument("model", type=Path, help="checkpoint file, model-hub directory or resnet-train run directory")
    p.add_argument("output", type=Path, help="file to write (.onnx, .stablehlo)")
    p.add_argument("--format", choices=FORMATS, help="artifact format (default: from OUT's suffix)")
    dtypes = sorted({d for ds in FORMAT_DTYPES.values() for d in ds})
    p.add_argument(
        "--dtype",
        choices=dtypes,
        default=FP32,
        help="compute dtype inside the artifact (onnx: fp32, fp16; default fp32)",
    )
    p.add_argument("--image-size", type=positive_int, help="input height and width (default: the model's, else 224)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Export args.model to args.output; prints what was written, returns the exit code."""
    try:
        fmt = format_of(args.output, args.format)
        done = export(args.model, args.output, fmt, dtype=args.dtype, image_size=args.image_size)
    except (CheckpointError, ConversionError, ExportError, OSError) as e:
        print(f"resnet-parity export: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{args.model} -> {done.path} ({fmt}, {args.dtype}, {done.size:,} bytes)")
    if done.metadata_path is not None:
        print(f"  class names and input: {done.metadata_path}")
    print(
        f"  verified: relative logit error {done.rel_err:.1e} against the Flax model (tolerance {done.tolerance:.0e})"
    )
    return 0
