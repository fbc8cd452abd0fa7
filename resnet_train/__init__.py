"""Optax training of the Flax ResNet (`resnet-train`), exported to PyTorch and verified.

The pieces are importable: ``create_train_state``, ``train_step`` and ``eval_step`` (pure, jit
them with your shardings) and ``fit`` (the whole loop) take one ``TrainConfig``.
"""

from .config import TrainConfig
from .loop import fit
from .steps import TrainState, create_train_state, eval_step, train_step

__all__ = ["TrainConfig", "TrainState", "create_train_state", "eval_step", "fit", "train_step"]
