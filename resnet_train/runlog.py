"""A run directory's record: metrics as JSON lines, the config, and a PNG plot of the curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from parity.files import atomic_write

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
PLOT_FILE = "curves.png"


def write_atomic(path: Path, data: bytes) -> None:
    """Write data to path all at once (temporary file beside it, then a rename)."""
    atomic_write(path, lambda f: f.write(data))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every metrics line written so far (earlier invocations of a resumed run included)."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (the file is rewritten under a temporary name and renamed)."""
    path = run_dir / METRICS_FILE
    old = path.read_bytes() if path.exists() else b""
    write_atomic(path, old + (json.dumps(record, sort_keys=True) + "\n").encode())


def plot_curves(run_dir: Path) -> Path | None:
    """loss and accuracy per epoch (train and test) as a PNG; None when there is nothing to plot."""
    records = [r for r in read_metrics(run_dir) if "epoch" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "test"):
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in records], marker="o", label=split)
        ax_acc.plot(epochs, [r[f"{split}_accuracy"] for r in records], marker="o", label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = run_dir / PLOT_FILE
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path
