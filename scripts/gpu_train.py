"""A real `resnet-train` run for scripts/gpu_check.sh: `--preset imagenet-resnet50 --dataset synthetic` (ResNet-50,
bf16, batch 256 at 224) for a few hundred steps, its export to PyTorch verified by the trainer; the run's training
images/s, whether its loss falls, and the export's check.

python3 scripts/gpu_train.py --out DIR [--dry-run]

--dry-run: the same run in a tiny CPU form (ResNet-18, small stem, 8x8, 6 steps). Runs in this process; writes
DIR/train.json and prints one line. Exit status 1 when the run fails, its loss does not fall or its export is
not verified.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from parity.conversion.atomic import atomic_write  # noqa: E402  (after the checkout is importable)

# 200 steps of batch 256; the export is checked on one synthetic test batch (256 images).
GPU = ("--preset", "imagenet-resnet50", "--dataset", "synthetic", "--train-limit", str(200 * 256), "--epochs", "1")
GPU_LOG = ("--warmup-epochs", "0.1", "--log-every", "20")
# ResNet-18 with the small stem at 8x8 in fp32, batch 8: 6 steps, logged every 2, evaluated and exported.
DRY = ("--preset", "imagenet-resnet50", "--dataset", "synthetic", "--arch", "resnet18", "--small-stem")
DRY_LOG: tuple[str, ...] = (
    "--image-size",
    "8",
    "--dtype",
    "fp32",
    "--batch-size",
    "8",
    "--train-limit",
    "48",
    "--epochs",
    "1",
)
DRY_LOG += ("--warmup-epochs", "0.25", "--log-every", "2", "--lr", "0.05")


def summarize(run_dir: Path, code: int, seconds: float, summary: dict[str, Any]) -> dict[str, Any]:
    """Images/s (median over --log-every windows, the first, which compiles, left out), the loss trend and
    the export's check (relative logit error against the float32 Flax model, predictions that differ)."""
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    steps = [r for r in map(json.loads, lines) if "epoch_progress" in r]
    out: dict[str, Any] = {"exit_code": code, "seconds": round(seconds, 1), "steps": steps[-1]["step"] if steps else 0}
    out.update({k: summary.get(k) for k in ("export", "export_rel_err", "export_mismatched_predictions", "error")})
    if len(steps) >= 3:
        losses = [r["loss"] for r in steps]
        out["images_per_s"] = statistics.median(r["images_per_s"] for r in steps[1:])
        out["first_loss"], out["last_loss"] = losses[0], min(losses[-2:])
        out["loss_falls"] = out["last_loss"] < out["first_loss"]
    return out


def line(run: dict[str, Any]) -> str:
    if "images_per_s" not in run:
        return f"train: FAILED (exit {run['exit_code']} after {run['seconds']} s, {run['steps']} steps): {run['error']}"
    trend = "falls" if run["loss_falls"] else "DOES NOT FALL"
    export = (
        f"export verified (rel {run['export_rel_err']:.1e}, {run['export_mismatched_predictions']} predictions differ)"
        if run["export"]
        else "NO EXPORT"
    )
    return (
        f"train: {run['images_per_s']:,.0f} img/s, loss {run['first_loss']:.3f} -> {run['last_loss']:.3f} ({trend}) "
        f"in {run['steps']} steps; {export}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where train.json goes")
    p.add_argument("--dry-run", action="store_true", help="the tiny CPU version")
    args = p.parse_args(argv)
    from resnet_train import main as train_main

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch) / "run"
        flags = [*(DRY + DRY_LOG if args.dry_run else GPU + GPU_LOG), "--run-dir", str(run_dir), "--no-progress"]
        start, stdout = time.monotonic(), io.StringIO()
        saved, sys.stdout = sys.stdout, stdout  # the summary line, read back
        try:
            code = train_main.main(flags)
        finally:
            sys.stdout = saved
        printed = stdout.getvalue().strip().splitlines()
        summary = json.loads(printed[-1]) if printed else {}
        run = {
            "command": "resnet-train " + " ".join(flags[:-3]),
            **summarize(run_dir, code, time.monotonic() - start, summary),
        }
    data = (json.dumps(run, indent=2) + "\n").encode()
    atomic_write(args.out / "train.json", lambda f: f.write(data))
    print(line(run))
    return 0 if run.get("loss_falls") and run["exit_code"] == 0 and run["export"] else 1


if __name__ == "__main__":
    sys.exit(main())
