"""Train-step and inference images/s of every ResNet implementation, side by side in one process.

    python benchmarks/throughput.py --arch resnet50 --batch 256 --dtype bf16 --device gpu --json out.json

Synthetic uint8 images are made and normalised on the device; warm-up (and compilation) is
excluded; the clock stops only when the device is done. On CPU it also reports latency at
batch 1 and 16. Prints a table and writes every figure, with machine and versions, as JSON.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import sys
import traceback
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a file (python benchmarks/throughput.py): make the checkout importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import LEVERS, NO_LEVERS  # noqa: E402  (imports no framework: XLA flags come first)

# implementation -> which modes it runs. resnet_flax is the fast path: it trains with the fused
# BatchNorm (resnet_flax.fused) and infers with BatchNorm folded (resnet_flax.fold); resnet_flax_plain
# is the plain mirror in both modes, the baseline of those two levers.
# Default order: the headline comparison first, so a run cut short by a time limit still has it.
IMPLS: dict[str, dict[str, bool]] = {
    "resnet_flax": {"train": True, "infer": True},
    "torchvision+compile": {"train": True, "infer": True},
    "resnet_flax_plain": {"train": True, "infer": True},
    "torchvision": {"train": True, "infer": True},
    "resnet_torch+compile": {"train": True, "infer": True},
    "resnet_torch": {"train": True, "infer": True},
    # The same model in Flax NNX (fused train step with nnx.Optimizer, folded inference), jitted as
    # nnx.split/merge around jax.jit, or with nnx.jit.
    "resnet_flax_nnx": {"train": True, "infer": True},
    "resnet_flax_nnx+nnx.jit": {"train": True, "infer": True},
}
# resnet_flax's train step with speed levers (benchmarks.common.LEVERS; "+levers" is all but bn_two_pass).
LEVER_IMPLS = {f"resnet_flax+{name}": name for name in LEVERS if name != NO_LEVERS}
IMPLS.update({impl: {"train": True, "infer": False} for impl in LEVER_IMPLS})
MODES = ("train", "infer")
# The comparisons the targets are stated in: (numerator, denominator) of images/s.
RATIOS = (
    ("resnet_flax", "torchvision+compile"),
    ("resnet_flax", "torchvision"),
    ("resnet_flax", "resnet_torch"),
    ("resnet_flax", "resnet_flax_plain"),
    ("resnet_flax_plain", "torchvision+compile"),
    ("resnet_torch", "torchvision"),
    ("resnet_torch+compile", "torchvision+compile"),
    ("resnet_flax_nnx", "resnet_flax"),
    ("resnet_flax_nnx+nnx.jit", "resnet_flax"),
    *((impl, "resnet_flax") for impl in LEVER_IMPLS),
    *((impl, "torchvision+compile") for impl in LEVER_IMPLS),
)
CPU_LATENCY_BATCHES = "1,16"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50", help="resnet18 .. resnet152 (default resnet50)")
    p.add_argument("--batch", type=int, default=256, help="batch size for throughput (default 256)")
    p.add_argument("--size", type=int, default=224, help="square image side in pixels (default 224)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="compute dtype (default bf16)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first, compilation included (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported (default 3)")
    p.add_argument("--impl", default=",".join(IMPLS), help=f"comma-separated subset of: {', '.join(IMPLS)}")
    p.add_argument("--mode", default=",".join(MODES), help="comma-separated subset of: train, infer")
    p.add_argument("--device", choices=("cpu", "gpu"), default="gpu", help="where to run (default gpu)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier width (default 1000)")
    p.add_argument(
        "--small-stem",
        action="store_true",
        help="3x3/1 stem without max-pool (resnet-train's default model); Flax and resnet_torch rows only",
    )
    p.add_argument(
        "--latency-batches",
        default=None,
        help=f"comma-separated batch sizes for per-call latency "
        f"(default {CPU_LATENCY_BATCHES} on cpu, none on gpu; '' for none)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch's CPU threads (default: torch's own); 1 avoids OpenMP stalls on a CPU shared with other jobs",
    )
    p.add_argument("--latency-calls", type=int, default=10, help="timed calls per latency figure (default 10)")
    p.add_argument(
        "--flax-steps-per-call",
        type=int,
        default=1,
        help="opt-in: each resnet_flax train call runs K steps under lax.scan on K batches (--steps counts calls)",
    )
    p.add_argument(
        "--xla-gpu-autotune-level", type=int, default=None, help="opt-in: XLA's --xla_gpu_autotune_level (0-5)"
    )
    p.add_argument(
        "--xla-gpu-command-buffer",
        default=None,
        help="opt-in: XLA's --xla_gpu_enable_command_buffer, e.g. '' (off) or FUSION,CUBLAS,CUDNN",
    )
    p.add_argument(
        "--xla-flag", action="append", default=[], help="opt-in: any extra XLA flag, e.g. --xla-flag=--xla_gpu_...=true"
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="build and warm up every implementation first, then take their timed repeats in turns "
        "(ratios robust to drift; needs memory for all at once)",
    )
    p.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    args = p.parse_args(argv)
    args.impls = _choices(args.impl, IMPLS, "--impl")
    args.modes = _choices(args.mode, MODES, "--mode")
    if args.small_stem and any(i.startswith("torchvision") for i in args.impls):
        p.error("--small-stem: torchvision's ResNet has no small stem; choose other --impl rows")
    latency = (
        CPU_LATENCY_BATCHES if args.latency_batches is None and args.device == "cpu" else args.latency_batches or ""
    )
    try:
        args.latency = [int(b) for b in latency.split(",") if b.strip()]
    except ValueError:
        p.error(f"--latency-batches expects comma-separated integers, got {latency!r}")
    for name in (
        "batch",
        "size",
        "steps",
        "repeats",
        "num_classes",
        "latency_calls",
        "torch_threads",
        "flax_steps_per_call",
    ):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 1:
        p.error(f"--warmup must be at least 1 (the first step compiles), got {args.warmup}")
    if any(b < 1 for b in args.latency):
        p.error(f"--latency-batches must be positive, got {args.latency}")
    return args


def _choices(text: str, allowed: Collection[str], flag: str) -> list[str]:
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in allowed]
    if unknown or not chosen:
        raise SystemExit(f"{flag}: unknown or empty choice {unknown or text!r}; expected some of {', '.join(allowed)}")
    return chosen


def xla_flags(args: argparse.Namespace) -> list[str]:
    """The opt-in XLA flags this run adds to XLA_FLAGS."""
    flags = list(args.xla_flag)
    if args.xla_gpu_autotune_level is not None:
        flags.append(f"--xla_gpu_autotune_level={args.xla_gpu_autotune_level}")
    if args.xla_gpu_command_buffer is not None:
        flags.append(f"--xla_gpu_enable_command_buffer={args.xla_gpu_command_buffer}")
    return flags


def configure_environment(args: argparse.Namespace) -> None:
    """Settings JAX reads once at start-up; must run before jax is imported."""
    if "jax" in sys.modules and xla_flags(args):
        raise SystemExit("XLA flags must be set before jax is imported; run the benchmark in a fresh process")
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *xla_flags(args)]).strip()
    if args.device == "gpu":
        # torch and JAX share one GPU here: JAX must not grab 75% of its memory up front.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


def builders() -> dict[tuple[str, str], Callable[..., Any]]:
    """(implementation, mode) -> a function of (settings, batch, Flax steps per call) that builds its Step."""
    from benchmarks import flax_steps, nnx_steps, torch_steps

    table: dict[tuple[str, str], Callable[..., Any]] = {
        ("resnet_flax", "train"): lambda s, b, k: flax_steps.train(s, fused_bn=True, steps_per_call=k),
        ("resnet_flax", "infer"): lambda s, b, k: flax_steps.infer(s, folded=True, batch=b),
        ("resnet_flax_plain", "train"): lambda s, b, k: flax_steps.train(s, fused_bn=False, steps_per_call=k),
        ("resnet_flax_plain", "infer"): lambda s, b, k: flax_steps.infer(s, folded=False, batch=b),
    }
    for impl, lever in LEVER_IMPLS.items():
        table[(impl, "train")] = lambda s, b, k, lv=lever: flax_steps.train(s, steps_per_call=k, levers=lv)
    for jit, name in nnx_steps.IMPLS.items():
        table[(name, "train")] = lambda s, b, k, j=jit: nnx_steps.train(s, jit=j)
        table[(name, "infer")] = lambda s, b, k, j=jit: nnx_steps.infer(s, jit=j, batch=b)
    for family in ("resnet_torch", "torchvision"):
        for compiled in (False, True):
            name = f"{family}+compile" if compiled else family
            table[(name, "train")] = lambda s, b, k, f=family, c=compiled: torch_steps.train(f, s, c)
            table[(name, "infer")] = lambda s, b, k, f=family, c=compiled: torch_steps.infer(f, s, c, batch=b)
    return table


def machine(device: str) -> dict[str, Any]:
    """CPU model and core count, GPU name, and the library versions that produced the figures."""
    import jax
    import jaxlib
    import numpy
    import torch

    from benchmarks.common import cpu_model
    from parity.checks.report import versions as library_versions

    cpu = cpu_model()
    versions = {**library_versions(), "jaxlib": jaxlib.__version__, "numpy": numpy.__version__}
    from benchmarks.torch_steps import torchvision_available

    if torchvision_available():
        import torchvision

        versions["torchvision"] = torchvision.__version__
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        "versions": versions,
    }
    if device == "gpu":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["jax_devices"] = [str(d) for d in jax.devices()]
        info["torch_tf32"] = {
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        }
    info["jax_default_matmul_precision"] = str(jax.config.values["jax_default_matmul_precision"])
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    info["torch_threads"] = torch.get_num_threads()
    if hasattr(os, "getloadavg"):
        # On a shared machine other processes slow every figure; the load average says how much.
        info["load_average_1min"] = os.getloadavg()[0]
    return info


def _release(device: str) -> None:
    """Free what the last implementation held before the next one starts."""
    gc.collect()
    if device == "gpu":
        import torch

        torch.cuda.empty_cache()


def _check_device(args: argparse.Namespace) -> None:
    import jax
    import torch

    if args.device == "gpu":
        if not torch.cuda.is_available():
            raise SystemExit("--device gpu: torch sees no CUDA device; use --device cpu")
        try:
            jax.devices("gpu")
        except RuntimeError as e:
            raise SystemExit(f"--device gpu: JAX sees no GPU ({e}); install jax[cuda12] or use --device cpu") from e
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest algorithms
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)


def _available(impls: list[str], explicit: bool) -> list[str]:
    from benchmarks.torch_steps import torchvision_available

    if torchvision_available():
        return impls
    wanted = [i for i in impls if i.startswith("torchvision")]
    if wanted and explicit:
        raise SystemExit(f"--impl {', '.join(wanted)}: torchvision is not installed")
    return [i for i in impls if not i.startswith("torchvision")]


def _record_error(report: dict[str, Any], impl: str, kind: str, error: Exception) -> None:
    report["errors"].append({"impl": impl, "what": kind, "error": f"{type(error).__name__}: {error}"})
    traceback.print_exc()


def _measure(kind: str, impl: str, report: dict[str, Any], measure: Callable[[], dict[str, Any]]) -> None:
    """Append one figure (or its error) to the report; one failure must not hide the others' figures."""
    try:
        report[kind].append({"impl": impl, **measure()})
    except Exception as e:  # noqa: BLE001 - recorded in the report and printed with its traceback
        _record_error(report, impl, kind, e)


def _figure(step: Any, batch: int, timing: dict[str, Any]) -> dict[str, Any]:
    """One throughput row of the report from a Step's timing."""
    print(f"  {step.impl:22s} {step.mode:5s} {batch / timing['step_s']:10.1f} img/s", flush=True)
    return {
        "mode": step.mode,
        "batch": batch,
        "steps_per_call": step.steps_per_call,
        "images_per_s": batch / timing["step_s"],
        "step_ms": 1e3 * timing["step_s"],
        "step_ms_all": [1e3 * t for t in timing["step_s_all"]],
        "first_step_s": timing["first_step_s"],
        "cpu_ms_per_step": 1e3 * timing["cpu_s"],
    }


def run(args: argparse.Namespace, save: Callable[[dict[str, Any]], None] = lambda report: None) -> dict[str, Any]:
    """Every chosen (implementation, mode) timed, then latencies; returns the JSON-ready report.

    One after another, each freed before the next; or, with ``--interleave``, all built and warmed up
    first and their timed repeats taken in turns. ``save`` gets the report after every figure, so a
    run cut short by a time limit keeps what it measured.
    """
    from benchmarks.common import Settings, time_interleaved, time_latency, time_steps, warm_up

    _check_device(args)
    impls = _available(args.impls, explicit=args.impl != ",".join(IMPLS))
    settings = Settings(args.arch, args.batch, args.size, args.dtype, args.device, args.num_classes, args.small_stem)
    table = builders()
    config = {k: v for k, v in vars(args).items() if k not in ("json", "impl", "mode", "latency_batches")}
    config["xla_flags_added"] = xla_flags(args)
    report: dict[str, Any] = {"config": config, "machine": machine(args.device)}
    report.update(results=[], ratios=[], latency=[], errors=[])
    chosen = [(impl, mode) for impl in impls for mode in args.modes if IMPLS[impl][mode]]

    def build(impl: str, mode: str) -> Any:
        return table[(impl, mode)](settings, None, args.flax_steps_per_call)

    def throughput(impl: str, mode: str) -> dict[str, Any]:
        step = build(impl, mode)
        return _figure(step, args.batch, time_steps(step, args.warmup, args.steps, args.repeats))

    def latency(impl: str, batch: int) -> dict[str, Any]:
        return {
            "batch": batch,
            **time_latency(table[(impl, "infer")](settings, batch, 1), args.warmup, args.latency_calls),
        }

    if args.interleave:
        warmed: list[tuple[Any, float]] = []
        for impl, mode in chosen:
            try:
                step = build(impl, mode)
                warmed.append((step, warm_up(step, args.warmup)))
            except Exception as e:  # noqa: BLE001 - recorded in the report and printed with its traceback
                _record_error(report, impl, "results", e)
        timings = time_interleaved([s for s, _ in warmed], [f for _, f in warmed], args.steps, args.repeats)
        report["results"] = [
            {"impl": s.impl, **_figure(s, args.batch, t)} for (s, _), t in zip(warmed, timings, strict=True)
        ]
        report["ratios"] = ratios(report["results"])
        save(report)
    else:
        for impl, mode in chosen:
            _measure("results", impl, report, functools.partial(throughput, impl, mode))
            report["ratios"] = ratios(report["results"])
            _release(args.device)
            save(report)
    for impl in (i for i in impls if IMPLS[i]["infer"]):
        for batch in args.latency:
            _measure("latency", impl, report, functools.partial(latency, impl, batch))
            _release(args.device)
            save(report)
    return report


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """images/s of one implementation over another's, per mode, where both were measured."""
    rate = {(r["impl"], r["mode"]): r["images_per_s"] for r in results}
    out = []
    for mode in MODES:
        for a, b in RATIOS:
            if (a, mode) in rate and (b, mode) in rate:
                out.append({"mode": mode, "impl": a, "over": b, "ratio": rate[(a, mode)] / rate[(b, mode)]})
    return out


def format_report(report: dict[str, Any]) -> str:
    """The human-readable tables: throughput, ratios, latency."""
    m, c = report["machine"], report["config"]
    where = m.get("gpu", f"{m['cpu']} ({m['cpu_cores']} cores)")
    lines = [
        f"{c['arch']} {c['dtype']} batch {c['batch']} at {c['size']}x{c['size']} on {where}; "
        f"{c['steps']} steps x {c['repeats']} repeats after {c['warmup']} warm-up",
        f"{'implementation':24s}{'mode':7s}{'images/s':>12s}{'ms/step':>10s}{'first step s':>14s}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['impl']:24s}{r['mode']:7s}{r['images_per_s']:12.1f}{r['step_ms']:10.2f}{r['first_step_s']:14.1f}"
        )
    for r in report["ratios"]:
        lines.append(f"{r['mode']:6s} {r['impl']} / {r['over']}: {r['ratio']:.3f}x")
    if report["latency"]:
        lines.append(f"{'latency (infer)':24s}{'batch':>7s}{'median ms':>12s}{'min ms':>10s}{'cpu ms':>10s}")
        for r in report["latency"]:
            lines.append(f"{r['impl']:24s}{r['batch']:7d}{r['median_ms']:12.1f}{r['min_ms']:10.1f}{r['cpu_ms']:10.1f}")
    for e in report["errors"]:
        lines.append(f"FAILED {e['impl']} {e['what']}: {e['error']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_environment(args)
    from parity.checks.report import write_json  # after configure_environment: it imports jax

    path = args.json
    report = run(args, save=(lambda r: write_json(path, r)) if path is not None else (lambda r: None))
    print(format_report(report))
    if path is not None:
        write_json(path, report)
        print(f"wrote {path}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
