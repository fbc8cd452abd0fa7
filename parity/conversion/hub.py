"""Model-hub directories: the weights file a hub's save function leaves, beside its ``config.json``.

transformers' ``save_pretrained`` and timm's ``save_for_hf`` write ``model.safetensors`` (or
``pytorch_model.bin``) and a ``config.json`` that says how to build the network. Reading a
directory gives the weights and that config, which the converter checks against the weights
(``parity.conversion.arch.check_hub_config``). Writing one gives the files the layout's own loader reads:
``ResNetForImageClassification.from_pretrained(DIR)`` for transformers,
``timm.create_model("local-dir:DIR", pretrained=True)`` for timm.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

import torch

from .atomic import atomic_write
from .exports import HUB_CONFIG_FILE, HUB_WEIGHTS_FILE
from .files import TORCH, Checkpoint, CheckpointError, read_checkpoint, write_checkpoint
from .validate import ConversionError
from .weights import Weights

# The weights files the hubs write, the one read first first.
WEIGHTS_FILES = (HUB_WEIGHTS_FILE, "pytorch_model.bin")
# Other weights files the hubs' loaders read (sharded weights' indexes, the other frameworks'): beside new
# weights they would describe another model.
OTHER_WEIGHTS_FILES = (
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "flax_model.msgpack",
    "tf_model.h5",
)
MODEL_FILES = (*WEIGHTS_FILES, *OTHER_WEIGHTS_FILES, HUB_CONFIG_FILE)
# The Python argument that lets write_hub_dir replace a directory's model files (the command line's --overwrite).
OVERWRITE_HINT = "overwrite=True"
# safetensors header metadata that transformers' loaders look for in a PyTorch weights file.
_TORCH_FORMAT = {"format": "pt"}


def read_hub_dir(path: str | os.PathLike) -> tuple[Checkpoint, dict[str, Any]]:
    """The weights of a hub directory and its config.json ({} when it has none)."""
    path = Path(path)
    weights = next((path / name for name in WEIGHTS_FILES if (path / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path}: a model directory holds {' or '.join(WEIGHTS_FILES)}; found neither")
    ckpt = read_checkpoint(weights)
    config_path = path / HUB_CONFIG_FILE
    if not config_path.is_file():
        return ckpt, {}
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path}: not a readable JSON file: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    return ckpt, config


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot remove this file of the replaced model: {e}") from e


def write_hub_dir(
    path: str | os.PathLike, weights: Weights, layout: str, param_dtype: Any = None, *, overwrite: bool = False
) -> tuple[dict[str, torch.Tensor], int]:
    """Write ``model.safetensors`` in ``layout``'s names, and the layout's config.json where it has one.

    ``param_dtype`` casts the floating-point weights (default: each keeps its dtype). Returns the
    state dict written and the bytes written. A directory that already holds model files (weights
    or a config.json, ``MODEL_FILES``) is refused unless ``overwrite``; with it, the new files replace
    them and every model file the new ones are not (a ``pytorch_model.bin`` beside the new
    ``model.safetensors``, a config.json that seed weights have none of) is removed, so no loader
    finds another model's files. Other files stay. Each file is written to a temp name and renamed.
    """
    path = Path(path)
    try:
        config = weights.spec.hub_config(layout)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    state_dict = weights.to_torch(layout, param_dtype)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory")
    if not overwrite and config is None and (path / HUB_CONFIG_FILE).exists():
        raise CheckpointError(
            f"{path}: holds a {HUB_CONFIG_FILE} that would not describe {layout} weights; remove it, write elsewhere "
            f"or replace the directory's model files ({OVERWRITE_HINT})"
        )
    existing = [name for name in MODEL_FILES if (path / name).exists()]
    if existing and not overwrite:
        raise CheckpointError(
            f"{path}: already holds model files ({', '.join(existing)}); write elsewhere or replace them "
            f"({OVERWRITE_HINT})"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot create the directory: {e}") from e
    size = write_checkpoint(
        path / HUB_WEIGHTS_FILE, state_dict, TORCH, {**_TORCH_FORMAT, "arch": weights.spec.describe()}
    )
    if config is not None:
        text = json.dumps(config, indent=2).encode()

        def write(f: IO[bytes]) -> None:
            f.write(text)

        try:
            size += atomic_write(path / HUB_CONFIG_FILE, write)
        except OSError as e:
            raise CheckpointError(f"{path / HUB_CONFIG_FILE}: cannot write: {e}") from e
    written = {HUB_WEIGHTS_FILE, *([HUB_CONFIG_FILE] if config is not None else [])}
    for name in existing:
        if name not in written:
            _remove(path / name)
    return state_dict, size
