"""Short real `resnet-train` runs for scripts/gpu_check.sh: ResNet-50 in bf16 (the imagenet-resnet50 preset)
on synthetic batches made on the device, then through the Grain pipeline on a generated JPEG folder;
each run's training images/s and whether its loss falls.

python3 scripts/gpu_train.py --out DIR [--dry-run] [--limit SECONDS]

--dry-run: the same two runs in a tiny CPU form (ResNet-18, 8x8). Writes DIR/train-gpu.json and
prints one line per run, the last one summing both up. Exit status 1 when a run fails or its loss
does not fall.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.input_pipeline import write_folder  # noqa: E402  (after the checkout is importable)
from parity.conversion.atomic import atomic_write  # noqa: E402


@dataclass(frozen=True)
class Plan:
    """The two resnet-train runs: the flags both share, each run's own, and the generated image folder."""

    common: tuple[str, ...]
    synthetic: tuple[str, ...]
    imagefolder: tuple[str, ...]
    images: tuple[int, int]  # generated JPEGs: training, held out
    synthetic_share: float  # of --limit, for the first run


# ResNet-50 at 224, batch 256: 24 steps on synthetic batches; 4 epochs of 4 steps on 1,024 JPEGs (256 held out).
GPU = Plan(
    common=("--preset", "imagenet-resnet50", "--batch-size", "256", "--log-every", "2"),
    synthetic=("--train-limit", str(24 * 256), "--epochs", "1", "--warmup-epochs", "0.25"),
    imagefolder=("--epochs", "4", "--warmup-epochs", "1"),
    images=(1024, 256),
    synthetic_share=0.4,
)
# ResNet-18 with the small stem at 8x8 in fp32, batch 8: 6 steps on synthetic batches; 2 epochs of 6 steps on 48
# JPEGs (8 held out), decoded in a worker process as on a GPU machine, but one only: each takes seconds to start on
# a small CPU. Each run still compiles, logs 3 windows or more, evaluates and checkpoints.
DRY = Plan(
    common=("--preset", "imagenet-resnet50", "--arch", "resnet18", "--small-stem", "--image-size", "8")
    + ("--dtype", "fp32", "--batch-size", "8", "--log-every", "2", "--workers", "1"),
    synthetic=("--train-limit", str(6 * 8), "--epochs", "1", "--warmup-epochs", "0.25"),
    imagefolder=("--epochs", "2", "--warmup-epochs", "0.5"),
    images=(48, 8),
    synthetic_share=0.4,
)


def make_folder(root: Path, train: int, held_out: int) -> None:
    """train/ and val/ of generated JPEGs (10 classes told apart by colour), written by every core."""
    cores = os.cpu_count() or 1
    parts = [(root / "train", range(i, train, cores)) for i in range(cores)]
    parts += [(root / "val", range(train + i, train + held_out, cores)) for i in range(cores)]
    with ProcessPoolExecutor() as pool:
        list(pool.map(write_folder, *zip(*parts, strict=True)))


def summarize(name: str, run_dir: Path, code: int, seconds: float) -> dict[str, Any]:
    """Images/s (median over --log-every windows, the first, which compiles, left out) and the loss trend."""
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    steps = [r for r in map(json.loads, lines) if "epoch_progress" in r]
    last = steps[-1]["step"] if steps else 0
    out: dict[str, Any] = {"dataset": name, "exit_code": code, "seconds": round(seconds, 1), "steps": last}
    if len(steps) >= 3:
        losses = [r["loss"] for r in steps]
        out["images_per_s"] = statistics.median(r["images_per_s"] for r in steps[1:])
        out["first_loss"], out["last_loss"] = losses[0], min(losses[-2:])
        out["loss_falls"] = out["last_loss"] < out["first_loss"]
    return out


def write_report(path: Path, report: dict[str, Any]) -> None:
    """The runs so far as JSON, written whole; through parity.conversion.atomic, which imports no framework
    (each run is a process of its own that imports them)."""
    data = (json.dumps(report, indent=2) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def line(run: dict[str, Any]) -> str:
    if "images_per_s" not in run:
        return f"{run['dataset']}: FAILED (exit {run['exit_code']} after {run['seconds']} s, {run['steps']} steps)"
    trend = "falls" if run["loss_falls"] else "DOES NOT FALL"
    return (
        f"{run['dataset']}: {run['images_per_s']:,.0f} img/s, loss {run['first_loss']:.3f} -> {run['last_loss']:.3f} "
        f"({trend}) in {run['steps']} steps"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where train-gpu.json goes")
    p.add_argument("--dry-run", action="store_true", help="tiny CPU versions of both runs")
    p.add_argument("--limit", type=float, default=95, help="seconds for both runs together (default 95)")
    args = p.parse_args(argv)
    plan = DRY if args.dry_run else GPU
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.limit
    report: dict[str, Any] = {"mode": "dry" if args.dry_run else "gpu", "runs": []}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "jpegs"
        for name in ("synthetic", "imagefolder"):
            run_dir = Path(scratch) / f"run-{name}"
            if name == "synthetic":
                data, own = ["--dataset", "synthetic"], plan.synthetic
            else:
                make_folder(folder, *plan.images)
                data, own = ["--data-dir", str(folder)], plan.imagefolder
            flags = [*plan.common, *data, *own, "--run-dir", str(run_dir), "--no-export", "--no-progress"]
            left = deadline - time.monotonic()
            limit = left * plan.synthetic_share if name == "synthetic" else left
            start = time.monotonic()
            try:
                code = subprocess.run(
                    [sys.executable, "-m", "resnet_train.main", *flags], cwd=REPO, timeout=limit
                ).returncode
            except subprocess.TimeoutExpired:
                code = 124
            report["runs"].append(summarize(name, run_dir, code, time.monotonic() - start))
            print(line(report["runs"][-1]), flush=True)
            write_report(args.out / "train-gpu.json", report)
    ok = [r.get("loss_falls", False) and r["exit_code"] == 0 for r in report["runs"]]
    print("; ".join(line(r) for r in report["runs"]))
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
