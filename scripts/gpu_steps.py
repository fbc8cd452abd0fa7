"""The steps of scripts/gpu_check.sh, each a function writing its figures as JSON into the report folder.

    python3 scripts/gpu_steps.py --out DIR STEP            # one step on the GPU (gpu_check.sh: one process each)
    python3 scripts/gpu_steps.py --out DIR --dry-run all   # every step in a tiny CPU form, in this one process

On a GPU each step runs at full size (ResNet-50 bf16, batch 256 at 224x224, the standard ImageNet training
shape; parity at every depth); the dry run walks the same code at tiny sizes on the CPU, in one process (one import of
torch and jax for all), each step's output in DIR/gpu-logs/STEP.log and its record in steps.tsv.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

# XLA GPU flags tried one at a time on the trainer's step; a flag this jaxlib does not know aborts XLA at
# start-up, which the step records as "unknown flag". The dry run adds one no jaxlib knows, to show that.
XLA_GPU_FLAGS = (
    "--xla_gpu_enable_command_buffer=",
    "--xla_gpu_force_conv_nhwc=true",
    "--xla_gpu_experimental_enable_conv_fusion=true",
)
DRY_UNKNOWN_FLAG = "--xla_gpu_flag_no_jaxlib_has=true"
UNKNOWN_FLAG_MARKS = ("Unknown flag", "unknown flag")
# Seconds per flag's process on the GPU (import, compile, 10 timed steps).
FLAG_LIMIT_S = 26
# ResNet-50 bf16 at batch 256, 224x224: the standard ImageNet training shape, where the throughput figures are compared.
BENCH = [
    "--arch",
    "resnet50",
    "--dtype",
    "bf16",
    "--batch",
    "256",
    "--size",
    "224",
    "--device",
    "gpu",
    "--mode",
    "train",
]
DRY_BENCH = ["--arch", "resnet18", "--dtype", "fp32", "--batch", "2", "--size", "32", "--device", "cpu"]
DRY_BENCH += ["--mode", "train", "--torch-threads", "1", "--latency-batches", ""]
LEVER_ROWS = [
    "resnet_flax+max_pool_argmax_grad",
    "resnet_flax+space_to_depth_stem",
    "resnet_flax+matmul_1x1",
    "resnet_flax+bn_two_pass",
    "resnet_flax+levers",
]


def environment(out: Path, dry: bool) -> int:
    """The card, driver and library versions."""
    import gpu_env

    gpu_env.main()
    return 0


def gpu_tests(out: Path, dry: bool) -> int:
    """The gpu-marked parity tests (fp32 with its SGD step under the floor rule, TF32, bf16, the fused model)
    and, on the GPU, the levers' float64 tests run there (JAX's default device)."""
    import pytest

    files = ["tests/test_parity_gpu.py"] + ([] if dry else ["tests/test_levers.py"])
    # -n 0: in this process, not on pytest-xdist's workers (one GPU, and the dry run's CPU, serve one test at a time).
    return int(pytest.main([*files, "-n", "0", "-q", "-p", "no:cacheprovider", "-W", "default", "--durations=5"]))


def _parity(out: Path, name: str, argv: list[str]) -> int:
    from parity import cli

    return cli.main(["check", *argv, "--json", str(out / f"{name}.json")])


def parity_fp64(out: Path, dry: bool) -> int:
    """Every float64 check (eval, train logits, running statistics, gradients, SGD steps) at every depth,
    both frameworks on the GPU, to 1e-10."""
    if dry:
        return _parity(out, "parity-fp64", ["--arch", "resnet18", "--precision", "fp64", "--device", "cpu"] + TINY)
    return _parity(out, "parity-fp64", ["--arch", "all", "--precision", "fp64", "--device", "gpu", *FP64_SIZE])


def parity_deep(out: Path, dry: bool) -> int:
    """ResNet-101 and ResNet-152 train mode (logits and running statistics) in strict fp32 and TF32, with the
    floor rule (torch against itself in float64 on the same batch)."""
    checks = ["--checks", "train logits,running stats"]
    if dry:
        return _parity(out, "parity-deep", ["--arch", "resnet18", "--precision", "fp32", "--device", "cpu"] + TINY)
    codes = [
        _parity(
            out, f"parity-deep-{arch}", ["--arch", arch, "--precision", "all", "--device", "gpu", *DEEP_SIZE, *checks]
        )
        for arch in ("resnet101", "resnet152")
    ]
    return max(codes)


# Tiny CPU parity: one check, 16x16, batch 2. On the GPU the deep checks run at 224x224 (ImageNet's input size),
# batch 8.
TINY = ["--size", "16", "16", "--batch", "2", "--checks", "eval logits"]
DEEP_SIZE = ["--size", "224", "224", "--batch", "8"]
# float64 at every depth: compiling dominates, so a smaller input (the 1e-10 bound does not depend on it).
FP64_SIZE = ["--size", "64", "64", "--batch", "4"]


def train(out: Path, dry: bool) -> int:
    """`resnet-train --preset imagenet-resnet50 --dataset synthetic` for a few hundred steps, export verified."""
    import gpu_train

    return gpu_train.main(["--out", str(out)] + (["--dry-run"] if dry else []))


def speed(out: Path, dry: bool) -> int:
    """The trainer's step against the torch loop, then each lever alone and all together."""
    from benchmarks import throughput

    if dry:
        impls = ["resnet_flax+levers", "resnet_torch"]
        argv = [*DRY_BENCH, "--steps", "1", "--warmup", "1", "--repeats", "1"]
    else:
        impls = ["resnet_flax", "torchvision+compile", *LEVER_ROWS]
        argv = [*BENCH, "--steps", "20", "--warmup", "3", "--repeats", "2"]
    return throughput.main([*argv, "--impl", ",".join(impls), "--json", str(out / "speed.json")])


def flag_argv(flag: str, json_path: Path) -> list[str]:
    """benchmarks/throughput.py's arguments that time the trainer's step under the XLA flag ``flag``."""
    argv = [*BENCH, "--impl", "resnet_flax", "--steps", "10", "--warmup", "2", "--repeats", "1"]
    return [*argv, "--json", str(json_path), f"--xla-flag={flag}"]


def _flag_run(flag: str, dry: bool, json_path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "XLA_FLAGS": flag}
    if dry:  # whether this jaxlib knows the flag: a tiny program on the CPU
        code = "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"
        return subprocess.Popen(
            [sys.executable, "-c", code],
            env={**env, "JAX_PLATFORMS": "cpu"},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    env.pop("XLA_FLAGS")  # throughput.py sets it from --xla-flag
    return subprocess.Popen(
        [sys.executable, "benchmarks/throughput.py", *flag_argv(flag, json_path)],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def flags(out: Path, dry: bool) -> int:
    """The trainer's step under each XLA GPU flag, one process each (XLA reads its flags once)."""
    # The dry run probes one flag every jaxlib knows and one none does: both paths, two imports of jax.
    tried = [XLA_GPU_FLAGS[0], DRY_UNKNOWN_FLAG] if dry else list(XLA_GPU_FLAGS)
    rows: list[dict[str, object]] = []
    # On the GPU one after another (each times the whole card); the dry run's probes at once.
    runs = [(f, _flag_run(f, dry, out / f"flag-{i}.json")) for i, f in enumerate(tried)] if dry else []
    for i, flag in enumerate(tried):
        proc = runs[i][1] if dry else _flag_run(flag, dry, out / f"flag-{i}.json")
        try:
            text, _ = proc.communicate(timeout=FLAG_LIMIT_S * (4 if dry else 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            text = proc.communicate()[0]
            rows.append({"flag": flag, "status": "timeout"})
            continue
        text = text or ""
        row: dict[str, object] = {"flag": flag, "exit_code": proc.returncode}
        if proc.returncode != 0 and any(m in text for m in UNKNOWN_FLAG_MARKS):
            row["status"] = "unknown flag"
        elif proc.returncode != 0:
            row["status"] = "failed"
            row["output_tail"] = text[-600:]
        else:
            row["status"] = "ok"
            figure = out / f"flag-{i}.json"
            if figure.exists():
                results = json.loads(figure.read_text())["results"]
                row["images_per_s"] = results[0]["images_per_s"] if results else None
                figure.unlink()
        print(json.dumps(row), flush=True)
        rows.append(row)
    (out / "flags.json").write_text(json.dumps({"baseline": "resnet_flax in speed.json", "rows": rows}, indent=1))
    return 0 if all(r["status"] in ("ok", "unknown flag") for r in rows) else 1


STEPS: dict[str, Callable[[Path, bool], int]] = {
    "environment": environment,
    "gpu-tests": gpu_tests,
    "parity-fp64": parity_fp64,
    "parity-deep": parity_deep,
    "train": train,
    "speed": speed,
    "flags": flags,
}


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[None]:
    """File descriptors 1 and 2 (Python's and C++'s output alike) into ``log`` while inside."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_logged(name: str, out: Path, dry: bool, record: Path) -> int:
    """One step with its output in its log and its (name, rc, seconds, command) line in ``record``."""
    start = time.monotonic()
    with output_to(out / "gpu-logs" / f"{name}.log"):
        try:
            code = STEPS[name](out, dry)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception:  # noqa: BLE001 - the traceback goes to the step's log; the next step still runs
            import traceback

            traceback.print_exc()
            code = 1
    seconds = round(time.monotonic() - start)
    with open(record, "a") as f:
        f.write(f"{name}\t{code}\t{seconds}\tscripts/gpu_steps.py --dry-run {name} (in one process)\n")
    print(f"== {name}: rc {code}, {seconds} s", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the report folder")
    p.add_argument("--dry-run", action="store_true", help="tiny CPU versions of the steps")
    p.add_argument("steps", nargs="+", choices=(*STEPS, "all"), help="which steps (all: every one, in order)")
    args = p.parse_args(argv)
    names = list(STEPS) if "all" in args.steps else args.steps
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run:
        return max(STEPS[name](args.out, False) for name in names)
    (args.out / "gpu-logs").mkdir(exist_ok=True)
    codes = [run_logged(name, args.out, True, args.out / "gpu-logs" / "steps.tsv") for name in names]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
