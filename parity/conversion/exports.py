"""Where a resnet-train run directory keeps its export, and the class names a hub config.json records.

Framework-free, so the trainer writes its export under these names without importing torch, and predict and
export find it by the same rule: the model-hub directory when the run wrote one, else the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

RUN_MARKER = "metrics.jsonl"  # the run's log: what tells a run directory from a hub directory
EXPORT_FILE = "model.safetensors"  # the PyTorch file a run exports
EXPORT_DIR = "model"  # or, in a model hub's layout, the directory holding HUB_CONFIG_FILE and HUB_WEIGHTS_FILE
HUB_WEIGHTS_FILE = "model.safetensors"
HUB_CONFIG_FILE = "config.json"


def run_export(path: Path) -> Path | None:
    """A run directory's export: its hub directory (EXPORT_DIR) when it wrote one, else its file (EXPORT_FILE),
    None when it has neither (trained with --no-export); any path that is no run directory as it is."""
    if not (path.is_dir() and (path / RUN_MARKER).is_file()):
        return path
    if (path / EXPORT_DIR).is_dir():
        return path / EXPORT_DIR
    return path / EXPORT_FILE if (path / EXPORT_FILE).is_file() else None


def export_of(path: Path) -> Path:
    """``run_export(path)``, or FileNotFoundError saying a run directory holds no export."""
    found = run_export(path)
    if found is None:
        raise FileNotFoundError(f"{path}: a training run without an export (trained with --no-export?)")
    return found


def hub_class_names(config: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The class names of a hub config.json: transformers' id2label (complete, 0..K-1) or timm's label_names."""
    id2label = config.get("id2label")
    if isinstance(id2label, Mapping) and set(id2label) == {str(i) for i in range(len(id2label))}:
        return tuple(str(id2label[str(i)]) for i in range(len(id2label)))
    names = config.get("label_names")
    return tuple(map(str, names)) if isinstance(names, list) else None
