"""Serving latency on the CPU: the exported ONNX file in onnxruntime against the same model in torch eager and
in JAX jit, at batch 1 and 16, timed interleaved in one process so the machine's load falls on all alike.

    python3 -m benchmarks.export_latency --arch resnet50 --size 224 --repeats 5 --json docs/cpu-export-latency.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime
import torch

import parity
import resnet_torch
from parity.checks.pairs import randomize_batchnorm
from parity.checks.report import versions, write_json
from parity.export import INPUT_NAME, ONNX, export


def _timer(fn: Callable[[], object], calls: int) -> float:
    """Median milliseconds of ``calls`` calls (after one untimed call)."""
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _runtimes(
    session: onnxruntime.InferenceSession, model: torch.nn.Module, forward: Callable, variables: object, x: np.ndarray
) -> dict[str, Callable[[], object]]:
    """One call of each runtime on the NCHW batch x (NHWC for JAX), each waiting for its result."""
    x_torch, x_jax = torch.from_numpy(x), jnp.asarray(x.transpose(0, 2, 3, 1))

    def torch_eager() -> object:
        with torch.no_grad():
            return model(x_torch)

    return {
        "onnxruntime": lambda: session.run(None, {INPUT_NAME: x}),
        "torch eager": torch_eager,
        "jax jit": lambda: forward(variables, x_jax).block_until_ready(),
    }


def main(argv: list[str] | None = None) -> None:
    """Export a random model, then time the three runtimes interleaved; print a table, optionally write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds; each times every runtime")
    p.add_argument("--calls", type=int, default=5, help="timed calls per runtime per round")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = resnet_torch.build(args.arch, num_classes=1000).eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "model.safetensors"
        parity.write_checkpoint(source, model.state_dict(), "torch")
        export(source, Path(tmp) / "model.onnx", ONNX, image_size=args.size)
        session = onnxruntime.InferenceSession(str(Path(tmp) / "model.onnx"), providers=["CPUExecutionProvider"])
        flax_model, variables = parity.load_checkpoint(source, "linen")
    forward = jax.jit(lambda v, x: flax_model.apply(v, x, train=False))
    rows = []
    for batch in args.batches:
        x = np.random.default_rng(batch).standard_normal((batch, 3, args.size, args.size)).astype(np.float32)
        runtimes = _runtimes(session, model, forward, variables, x)
        times: dict[str, list[float]] = {name: [] for name in runtimes}
        for _ in range(args.repeats):
            for name, fn in runtimes.items():
                times[name].append(_timer(fn, args.calls))
        for name, t in times.items():
            rows.append({"runtime": name, "batch": batch, "ms": statistics.median(t), "ms_all": t})
    print(f"{args.arch} fp32 at {args.size}x{args.size}, CPU ({torch.get_num_threads()} torch threads)")
    print(f"{'runtime':<12} {'batch':>5} {'ms (median)':>12} {'vs torch':>9}")
    for row in rows:
        ref = next(r["ms"] for r in rows if r["batch"] == row["batch"] and r["runtime"] == "torch eager")
        print(f"{row['runtime']:<12} {row['batch']:>5} {row['ms']:>12.1f} {row['ms'] / ref:>8.2f}x")
    if args.json:
        meta = {"arch": args.arch, "size": args.size, "repeats": args.repeats, "calls": args.calls, **versions()}
        write_json(args.json, {"settings": meta, "rows": rows})


if __name__ == "__main__":
    main()
