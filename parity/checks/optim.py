"""torch.optim.SGD as an optax chain: the one optimizer the parity checks prove, training and
the benchmarks use."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax


def torch_sgd(
    learning_rate: float | optax.Schedule,
    momentum: float,
    weight_decay: float,
    *,
    nesterov: bool = False,
    decay_mask: Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
    """The optax chain that computes what ``torch.optim.SGD(lr, momentum, weight_decay, nesterov)`` computes.

    torch (dampening 0): d = g + wd * p; buf = d on the first step (a copy, not
    momentum * 0 + (1 - dampening) * d: the same value), else buf = momentum * buf + d; with
    Nesterov d = d + momentum * buf, else d = buf; p -= lr * d.
    optax: add_decayed_weights gives d = g + wd * p (coupled L2, as torch, not AdamW-style); sgd's
    trace starts at zeros, so its first buf = d + momentum * 0 = d as torch's, then
    buf = d + momentum * buf, and Nesterov adds momentum * buf again; scale_by_learning_rate gives
    -lr * d, added to p. ``decay_mask`` (params -> bools) limits the decay to some leaves, as
    torch's parameter groups do.
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay, decay_mask),
        optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov),
    )
