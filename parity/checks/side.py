"""The Flax side of a parity pair: what every check asks of a Flax model, whichever API holds it.

``parity.checks.linen.LinenSide`` runs a ``resnet_flax.ResNet`` over its variables and
``parity.checks.nnx.NnxSide`` a ``resnet_flax.nnx.ResNet``; the checks see only this interface.
Results are plain nested dicts under the linen paths (``{'params': ..., 'batch_stats': ...}``), which
``parity.conversion.rules.torch_layout`` lays out as torch's state dict without checking anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import jax

# Jitted check functions are cached per (hashable) Flax model or NNX graph definition, so repeated
# checks of one model compile once.
JIT_CACHE_SIZE = 16

Variables = dict[str, Any]  # {'params': ..., 'batch_stats': ...}, nested dicts of arrays
Stages = dict[str, jax.Array]  # stage name (conv1, conv2_x .. conv5_x, fc) -> its output, NHWC


class FlaxSide(Protocol):
    """A Flax ResNet holding the pair's weights, called as the checks need it."""

    @property
    def variables(self) -> Variables:
        """The model's weights and BatchNorm state as linen variables (the same arrays)."""
        ...

    def eval_stages(self, x: jax.Array) -> Stages:
        """Every stage's eval-mode output for NHWC images ``x``."""
        ...

    def train_step(
        self, params: Any, batch_stats: Any, x: jax.Array, y: jax.Array, with_gradients: bool
    ) -> tuple[Any | None, Any, Stages]:
        """One train-mode call from the given variables: (gradients of the mean cross-entropy, or None
        without ``with_gradients``; the updated batch_stats; every stage's output)."""
        ...

    def sgd_steps(
        self, batches: Sequence[tuple[jax.Array, jax.Array]], learning_rate: float, momentum: float, weight_decay: float
    ) -> Variables:
        """The variables after one train-mode ``torch_sgd`` step per (x, y) batch; the model is unchanged."""
        ...
