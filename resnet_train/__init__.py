"""Optax training of the Flax ResNet (`resnet-train`), exported to PyTorch and verified.

The pieces are importable: ``create_train_state``, ``train_step`` and ``eval_step`` (pure, jit
them with your shardings) and ``fit`` (the whole loop) take one ``TrainConfig``.

They are imported on first use, so that `resnet-train` catches SIGTERM and Ctrl-C before the
seconds that jax, torch and orbax take to import.
"""

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "config",
    "fit": "loop",
    "TrainState": "steps",
    "create_train_state": "steps",
    "eval_step": "steps",
    "train_step": "steps",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
