"""The Flax side of the parity checks for linen ``resnet_flax.ResNet`` models.

Eval and train-mode calls are ``jax.jit`` of ``model.apply``, cached per model; SGD steps are the
optax ``torch_sgd`` chain applied to the train-mode gradients.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax
import torch

import resnet_flax
from resnet_flax.fused import fused

from ..conversion.convert import arch_of, torch_to_flax
from .optim import torch_sgd
from .precision import Mode, jax_device
from .side import JIT_CACHE_SIZE, Stages, Variables


@functools.lru_cache(maxsize=JIT_CACHE_SIZE)
def _jitted_eval(model: resnet_flax.ResNet) -> Callable[..., Stages]:
    return jax.jit(lambda v, x: model.apply(v, x, train=False, return_stages=True))


def _train_forward(model: resnet_flax.ResNet) -> Callable[..., tuple[jax.Array, Any]]:
    """(params, batch_stats, x, y) -> (mean cross-entropy, (updated batch_stats, stage outputs)).

    One function serves the train-mode, gradient and SGD checks, so XLA compiles it once per model.
    The loss is F.cross_entropy's: softmax cross-entropy with integer labels, averaged over the batch.
    """

    def loss_fn(params: Any, batch_stats: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Any]:
        stages, updated = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, return_stages=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(stages["fc"], y).mean()
        return loss, (updated["batch_stats"], stages)

    return loss_fn


@functools.lru_cache(maxsize=JIT_CACHE_SIZE)
def _jitted_train(model: resnet_flax.ResNet, with_gradients: bool) -> Callable[..., tuple[Any, Any]]:
    loss_fn = _train_forward(model)
    if with_gradients:
        return jax.jit(jax.grad(loss_fn, has_aux=True))
    # The forward alone compiles several times faster than its gradient.
    return jax.jit(lambda *args: (None, loss_fn(*args)[1]))


@functools.lru_cache(maxsize=JIT_CACHE_SIZE)
def _jitted_sgd(
    learning_rate: float, momentum: float, weight_decay: float
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Jitted (init, update) of torch_sgd; update applies the updates and returns (params, state)."""
    tx = torch_sgd(learning_rate, momentum, weight_decay)

    def update(grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(tx.init), jax.jit(update)


@dataclasses.dataclass
class LinenSide:
    """A linen ResNet and its variables, committed to one JAX device."""

    model: resnet_flax.ResNet
    variables: Variables
    jax_device: jax.Device

    @classmethod
    def from_torch(cls, torch_model: torch.nn.Module, mode: Mode, device: str, fused_bn: bool) -> LinenSide:
        """The torch model's weights in a ``resnet_flax`` model of the architecture they describe, in
        ``mode``'s dtypes and precision (``fused_bn``: the fused train-mode BatchNorm training uses),
        converted by ``torch_to_flax``."""
        model = arch_of(torch_model).flax_model(
            dtype=mode.jax_dtype,
            param_dtype=mode.jax_param_dtype,
            precision=mode.jax_precision,
        )
        if fused_bn:
            model = fused(model)
        target = jax_device(device)
        # Committed to the run's device once, so every jitted call runs there.
        variables = jax.device_put(torch_to_flax(torch_model.state_dict(), target=model), target)
        return cls(model, variables, target)

    def eval_stages(self, x: jax.Array) -> Stages:
        """Every stage's eval-mode output for NHWC images ``x``."""
        return _jitted_eval(self.model)(self.variables, x)

    def train_step(
        self, params: Any, batch_stats: Any, x: jax.Array, y: jax.Array, with_gradients: bool
    ) -> tuple[Any | None, Any, Stages]:
        """One train-mode call: (gradients or None, updated batch_stats, stage outputs)."""
        grads, (batch_stats, stages) = _jitted_train(self.model, with_gradients)(params, batch_stats, x, y)
        return grads, batch_stats, stages

    def sgd_steps(
        self, batches: Sequence[tuple[jax.Array, jax.Array]], learning_rate: float, momentum: float, weight_decay: float
    ) -> Variables:
        """The variables after one optax ``torch_sgd`` step per (x, y) batch, gradients from ``train_step``."""
        init, update = _jitted_sgd(learning_rate, momentum, weight_decay)
        params, stats = self.variables["params"], self.variables["batch_stats"]
        opt_state = jax.device_put(init(params), self.jax_device)
        for x, y in batches:
            grads, stats, _ = self.train_step(params, stats, x, y, with_gradients=True)
            params, opt_state = update(grads, opt_state, params)
        return {"params": params, "batch_stats": stats}
