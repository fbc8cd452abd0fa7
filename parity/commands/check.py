"""resnet-parity check: prove that resnet_torch and resnet_flax compute the same function."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from resnet_arch import APIS, ARCH_NAMES, DEPTHS, LINEN, NNX

from ..checks.precision import (
    CHECKS,
    DEVICES,
    MODES,
    PRECISIONS,
    applied,
    jax_device,
    precisions_for,
    torch_tf32_summary,
)
from ..checks.reference import REFERENCES, RESNET_TORCH, check_reference
from ..checks.report import format_error, format_result, header, versions, write_json
from ..checks.run import run_checks
from ..conversion.atomic import is_stream
from .args import EXIT_BAD_INPUT, positive_int

DEFAULT_SIZE = (97, 131)  # odd and non-square: 'SAME' and symmetric padding differ at every stride
DEFAULT_BATCH = 2
EXIT_FAILED = 1  # some check exceeded its tolerance or raised
# The Flax model that --api and --fused-bn check, as the table's heading and the JSON report name it.
FLAX_MODELS = {
    (LINEN, False): "ResNet",
    (LINEN, True): "fused(ResNet) (resnet_flax.fused)",
    (NNX, False): "resnet_flax.nnx.ResNet",
    (NNX, True): "resnet_flax.nnx.ResNet with the fused BatchNorm (resnet_flax.nnx.fused)",
}


def _check_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in CHECKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(CHECKS)}, got {text!r}")
    return names


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="prove both frameworks compute the same function (logits, BN stats, gradients, SGD)",
        description="Build a random model at each depth, copy its weights to Flax with the converter, and "
        "compare both frameworks on a random batch: eval logits, train-mode logits and running "
        "statistics, cross-entropy gradients, and parameters after SGD steps (momentum, weight decay). "
        "Prints a table and exits non-zero when any check exceeds its tolerance; a failed check names "
        "the first stage (conv1, conv2_x..conv5_x, fc) whose outputs diverge.",
    )
    p.add_argument(
        "--arch",
        choices=(*ARCH_NAMES, "all"),
        default="resnet18",
        help="depth or family builder name, or all (the five depths) (default: resnet18)",
    )
    p.add_argument("--device", choices=DEVICES, default="cpu", help="where both frameworks run (default: cpu)")
    p.add_argument(
        "--precision",
        choices=(*PRECISIONS, "all"),
        default="all",
        help="arithmetic; all = fp64, fp32 on cpu and fp32, tf32, bf16 on gpu (default: all)",
    )
    p.add_argument(
        "--size",
        nargs=2,
        type=positive_int,
        metavar=("H", "W"),
        default=DEFAULT_SIZE,
        help=f"input height and width (default: {DEFAULT_SIZE[0]} {DEFAULT_SIZE[1]})",
    )
    p.add_argument("--batch", type=positive_int, default=DEFAULT_BATCH, help=f"batch size (default: {DEFAULT_BATCH})")
    p.add_argument(
        "--checks",
        type=_check_list,
        default=CHECKS,
        help=f"comma-separated subset of: {', '.join(CHECKS)} (default: all)",
    )
    p.add_argument(
        "--fused-bn",
        action="store_true",
        help="check fused(ResNet) (resnet_flax.fused), the fused-BatchNorm model training uses, instead of ResNet",
    )
    p.add_argument(
        "--api",
        choices=APIS,
        default=LINEN,
        help="the Flax model checked: linen (resnet_flax) or nnx (resnet_flax.nnx, via parity.torch_to_nnx) "
        f"(default: {LINEN})",
    )
    p.add_argument(
        "--reference",
        choices=REFERENCES,
        default=RESNET_TORCH,
        help="the torch model the Flax model is checked against: this project's resnet_torch, or torchvision's "
        f"or timm's own model of --arch (built locally, random weights) (default: {RESNET_TORCH})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default: 0)")
    p.add_argument(
        "--json",
        metavar="FILE",
        help="also write every result, the modes and versions as JSON (written first with no results, so an "
        "unwritable place stops the run at once)",
    )
    p.set_defaults(run=run)


def _payload(args: argparse.Namespace, runs: list[dict[str, Any]], complete: bool, passed: bool) -> dict[str, Any]:
    """The JSON report: settings, versions and every run's results."""
    return {
        "device": args.device,
        "size": list(args.size),
        "batch": args.batch,
        "seed": args.seed,
        "api": args.api,
        "reference": args.reference,
        "flax_model": FLAX_MODELS[args.api, args.fused_bn],
        "complete": complete,
        "passed": passed,
        "versions": versions(),
        "runs": runs,
    }


def _saved(args: argparse.Namespace, runs: list[dict[str, Any]], complete: bool, passed: bool) -> bool:
    """Write the --json report; False, with a sentence on stderr, when it cannot be written."""
    try:
        write_json(args.json, _payload(args, runs, complete, passed))
    except OSError as e:
        print(f"resnet-parity check: error: cannot write --json {args.json}: {e.strerror or e}", file=sys.stderr)
        return False
    return True


def run(args: argparse.Namespace) -> int:
    """Run the checks, print the table as results arrive, and return the exit code."""
    archs = tuple(DEPTHS) if args.arch == "all" else (args.arch,)
    size = tuple(args.size)
    try:
        precisions = precisions_for(args.device, args.precision)
        jax_device(args.device)
        for arch in archs:
            check_reference(arch, args.reference)
    except (ValueError, RuntimeError) as e:
        print(f"resnet-parity check: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    runs: list[dict[str, Any]] = []
    failed = False
    # A file is written first (so an unwritable path fails before minutes of checks) and after every run;
    # a stream (a FIFO, /dev/stdout) gets one document, the final report, once.
    rewrite = bool(args.json) and not is_stream(args.json)
    if rewrite and not _saved(args, runs, complete=False, passed=False):
        return EXIT_BAD_INPUT
    flax_model = FLAX_MODELS[args.api, args.fused_bn]
    print(
        f"device {args.device}, input {args.batch}x3x{size[0]}x{size[1]}, seed {args.seed}, "
        f"torch {args.reference}, flax {flax_model}"
    )
    modes = {}
    for precision in precisions:
        with applied(MODES[precision], args.device):
            modes[precision] = f"{MODES[precision].describe(args.device)} [{torch_tf32_summary()}]"
        print(f"precision {modes[precision]}")
    print(header(), flush=True)
    for arch in archs:
        for precision in precisions:
            run_info: dict[str, Any] = {"arch": arch, "precision": precision, "mode": modes[precision]}
            try:
                results = run_checks(
                    arch,
                    args.device,
                    precision,
                    size,
                    args.batch,
                    args.seed,
                    args.checks,
                    args.fused_bn,
                    args.api,
                    args.reference,
                )
            except Exception as e:  # one broken run must not hide the others' figures
                print(format_error(arch, precision, e), flush=True)
                run_info["error"] = f"{type(e).__name__}: {e}"
                failed = True
            else:
                for r in results:
                    print(format_result(r), flush=True)
                run_info["results"] = [r.to_json() for r in results]
                failed |= not all(r.passed for r in results)
            runs.append(run_info)
            # Rewritten after every run, so an interrupted run still leaves the figures it has.
            complete = len(runs) == len(archs) * len(precisions)
            if rewrite and not _saved(args, runs, complete, passed=complete and not failed):
                return EXIT_BAD_INPUT
    if args.json and not rewrite and not _saved(args, runs, complete=True, passed=not failed):
        return EXIT_BAD_INPUT
    print("FAILED: some checks exceed their tolerance" if failed else "all checks pass")
    return EXIT_FAILED if failed else 0
