"""Time parity.torch_to_flax and parity.flax_to_torch per depth and layout, first call in a fresh process.

Each (depth, layout) runs in its own subprocess so the first call pays every one-time cost (jax
backend start, allocator warm-up); the second call shows the steady state. torch_to_flax reads a
state dict in the layout's names; flax_to_torch writes one. Usage:
python benchmarks/convert_speed.py [resnet152 ...] [--layouts seed transformers] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from parity.conversion.names import LAYOUTS
from resnet_arch import DEPTHS

_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import jax, torch
import parity, resnet_torch
from parity.conversion.convert import check_state_dict
imported = time.perf_counter() - t0
arch, layout = sys.argv[1:3]
seed = resnet_torch.build(arch, num_classes=1000, init_weights=False).state_dict()
sd = check_state_dict(seed).to_torch(layout)  # the same tensors under the layout's names
out = {"import_s": imported, "tensors": len(sd), "bytes": sum(t.nbytes for t in sd.values())}
def timed(key, fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    result = jax.block_until_ready(fn(*args, **kwargs))
    out[key], out[key + "_cpu"] = time.perf_counter() - wall, time.process_time() - cpu
    return result
for run in ("first", "second"):
    v = timed(f"torch_to_flax_{run}", parity.torch_to_flax, sd)
    back = timed(f"flax_to_torch_{run}", parity.flax_to_torch, v, layout)
    del v, back
print(json.dumps(out))
"""
_COLUMNS = ("torch_to_flax_first", "torch_to_flax_second", "flax_to_torch_first", "flax_to_torch_second")


def measure(arch: str, layout: str) -> dict[str, float]:
    """One fresh process: conversion times of one depth in one layout (seconds)."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, arch, layout], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", default=list(DEPTHS), help=f"depths to time (default: {', '.join(DEPTHS)})")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS), help="torch key layouts")
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per depth and layout; the best is shown")
    args = parser.parse_args(argv)
    unknown = [a for a in args.archs if a not in DEPTHS]
    if unknown:
        parser.error(f"unknown arch {', '.join(unknown)}; expected one of {', '.join(DEPTHS)}")
    print("seconds, wall (CPU time in brackets); 'first' is the first call in a fresh process")
    print(
        f"{'arch':<10} {'layout':<12} {'tensors':>7} {'MB':>6}  "
        f"{'torch->flax first':>19} {'second':>15}  {'flax->torch first':>19} {'second':>15}"
    )
    for arch in args.archs:
        for layout in args.layouts:
            runs = [measure(arch, layout) for _ in range(args.repeat)]
            best = {k: min(r[k] for r in runs) for k in runs[0]}
            cells = [f"{best[k]:.3f} ({best[k + '_cpu']:.3f})" for k in _COLUMNS]
            print(
                f"{arch:<10} {layout:<12} {best['tensors']:>7} {best['bytes'] / 1e6:>6.1f}  "
                f"{cells[0]:>19} {cells[1]:>15}  {cells[2]:>19} {cells[3]:>15}"
            )
    print(f"(best of {args.repeat} fresh processes per row; {time.strftime('%Y-%m-%d %H:%M')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
