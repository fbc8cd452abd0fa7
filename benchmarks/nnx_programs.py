"""Does the NNX model compile to the linen model's program, and what does each way of jitting it cost the host?

    python benchmarks/nnx_programs.py --arch resnet50 --batch 16 --size 224 --mode infer
    python benchmarks/nnx_programs.py --arch resnet18 --small-stem --batch 32 --size 32 --num-classes 10 --mode train

Two figures that a shared machine's noise cannot blur, beside throughput.py's interleaved timings:
the compiled programs (XLA's flop and byte counts and its operations, linen against NNX in the
split/merge form), and the host time of one call (until the call returns, the device work queued)
for linen under jax.jit, NNX under split/merge + jax.jit and NNX under nnx.jit, taken in turns.
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50", help="resnet18 .. resnet152 (default resnet50)")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--size", type=int, default=224, help="square image side (default 224)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier width (default 1000)")
    p.add_argument("--small-stem", action="store_true", help="3x3/1 stem without max-pool")
    p.add_argument("--mode", choices=("train", "infer"), default="infer", help="train step or inference")
    p.add_argument("--calls", type=int, default=20, help="timed calls per implementation (default 20)")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    return p.parse_args(argv)


def _cost(compiled: Any) -> dict[str, Any]:
    """XLA's flop and byte counts and a histogram of the operations in the optimised program."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ops = collections.Counter(re.findall(r"= \S+ (\w[\w.-]*)\(", compiled.as_text()))
    return {"flops": cost["flops"], "bytes_accessed": cost["bytes accessed"], "ops": dict(ops)}


def programs(settings: Any, mode: str) -> dict[str, dict[str, Any]]:
    """The compiled linen and NNX (split/merge) programs of one mode, described by ``_cost``."""
    from benchmarks import flax_steps, nnx_steps

    if mode == "infer":
        variables, forward = flax_steps._inference(settings, folded=True)
        images, _ = flax_steps._data(settings, settings.batch)
        linen = forward.lower(variables, images)
        jitted, state, images = nnx_steps.split_infer(settings)
        nnx = jitted.lower(state, images)
    else:
        config = flax_steps.trainer_config(settings)
        images, labels = flax_steps._data(settings, settings.batch)
        state = flax_steps.trainer_state(settings, config)
        linen = flax_steps.make_train_step(config).lower(state, images, labels)
        jitted, nnx_state, images, labels = nnx_steps.split_train(settings)
        nnx = jitted.lower(nnx_state, images, labels)
    return {"linen": _cost(linen.compile()), "nnx": _cost(nnx.compile())}


def host_times(settings: Any, mode: str, calls: int) -> dict[str, dict[str, float]]:
    """Milliseconds of host time per call (the call's return, the device work queued), taken in turns."""
    from benchmarks.common import warm_up
    from benchmarks.throughput import builders

    table = builders()
    impls = ("resnet_flax", "resnet_flax_nnx", "resnet_flax_nnx+nnx.jit")
    steps = [table[(impl, mode)](settings, None, 1) for impl in impls]
    for step in steps:
        warm_up(step, 2)
    host: dict[str, list[float]] = {impl: [] for impl in impls}
    for r in range(calls):
        for i in [(r + k) % len(steps) for k in range(len(steps))]:
            start = time.perf_counter()
            steps[i].run()
            host[impls[i]].append(1e3 * (time.perf_counter() - start))
            steps[i].sync()
    return {impl: {"median_ms": statistics.median(t), "min_ms": min(t)} for impl, t in host.items()}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from benchmarks.common import Settings
    from benchmarks.throughput import machine
    from parity.checks.report import write_json

    settings = Settings(args.arch, args.batch, args.size, "fp32", "cpu", args.num_classes, args.small_stem)
    described = programs(settings, args.mode)
    linen, nnx = described["linen"], described["nnx"]
    differing = {op: (linen["ops"].get(op, 0), nnx["ops"].get(op, 0)) for op in set(linen["ops"]) | set(nnx["ops"])}
    differing = {op: counts for op, counts in differing.items() if counts[0] != counts[1]}
    hosts = host_times(settings, args.mode, args.calls)
    stem = ", small stem" if args.small_stem else ""
    print(f"{args.arch}{stem} fp32 {args.mode}, batch {args.batch} at {args.size}x{args.size}, CPU")
    for key in ("flops", "bytes_accessed"):
        print(f"  {key:15s} linen {linen[key]:,.0f}  nnx {nnx[key]:,.0f}  (nnx / linen {nnx[key] / linen[key]:.6f})")
    print(f"  operations      linen {sum(linen['ops'].values()):,}  nnx {sum(nnx['ops'].values()):,}")
    print(f"  differing       {differing or 'none: the same operations'}")
    for impl, t in hosts.items():
        print(f"  host per call   {impl:24s} median {t['median_ms']:8.2f} ms  min {t['min_ms']:8.2f} ms")
    if args.json is not None:
        report = {"config": vars(args) | {"json": str(args.json)}, "machine": machine("cpu")}
        report.update(programs={k: {**v, "ops_total": sum(v["ops"].values())} for k, v in described.items()})
        report.update(differing_ops=differing, host_ms_per_call=hosts)
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
