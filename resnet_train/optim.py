"""The optax optimizer a TrainConfig describes: SGD or AdamW, weight decay by rule, warm-up + cosine."""

from __future__ import annotations

from typing import Any

import jax
import optax

from parity.checks.optim import torch_sgd

from .config import TrainConfig


def schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """Linear warm-up from 0 to config.lr over warmup_epochs, then cosine decay to 0 at the last step."""
    total = config.epochs * steps_per_epoch
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, max(total, warmup + 1), end_value=0.0)


def decay_mask(params: Any) -> Any:
    """True for kernels (ndim >= 2), False for BatchNorm scales/biases and the fc bias, as nanoGPT does."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optimizer over `params`; decay applies to every param or, by default, only to kernels."""
    lr = schedule(config, steps_per_epoch)
    mask = None if config.decay_bn_bias else decay_mask
    if config.optimizer == "adamw":
        return optax.adamw(lr, b1=config.momentum, weight_decay=config.weight_decay, mask=mask)
    return torch_sgd(lr, config.momentum, config.weight_decay, nesterov=config.nesterov, decay_mask=mask)
