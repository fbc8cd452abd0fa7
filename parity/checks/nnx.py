"""The Flax side of the parity checks for ``resnet_flax.nnx`` models.

Eval and train-mode calls are jitted over the model's split state (``nnx.split`` outside,
``nnx.merge`` inside ``jax.jit``), cached per graph definition as the linen side caches per
model; SGD steps run ``nnx.Optimizer`` over the same ``torch_sgd`` chain under ``nnx.jit``.
Results come back as pure dicts under the linen paths (``nnx.to_pure_dict``), unchecked.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax
import torch
from flax import nnx

from resnet_flax import nnx as flax_nnx

from ..conversion.convert import arch_of
from ..conversion.nnx import nnx_model, torch_to_nnx
from .optim import torch_sgd
from .precision import Mode, jax_device
from .side import JIT_CACHE_SIZE, Stages, Variables


def _loss(model: flax_nnx.ResNet, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Any]:
    """F.cross_entropy's mean softmax cross-entropy of a forward pass, and every stage's output."""
    stages: Any = model(x, return_stages=True)
    return optax.softmax_cross_entropy_with_integer_labels(stages["fc"], y).mean(), stages


@functools.lru_cache(maxsize=JIT_CACHE_SIZE)
def _jitted_eval(graphdef: nnx.GraphDef) -> Callable[..., Stages]:
    def forward(state: Any, x: jax.Array) -> Stages:
        model = nnx.merge(graphdef, state)
        model.eval()
        return model(x, return_stages=True)

    return jax.jit(forward)


@functools.lru_cache(maxsize=JIT_CACHE_SIZE)
def _jitted_train(graphdef: nnx.GraphDef, with_gradients: bool) -> Callable[..., tuple[Any, Any]]:
    """(params, batch_stats, x, y) -> (gradients or None, (new batch_stats, stage outputs)), pure dicts.

    The model is merged from the given state, put in train mode and called once, so its BatchNorms
    update the statistics in place; the new statistics are read back from it.
    """

    def step(params: Any, batch_stats: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any]:
        model = nnx.merge(graphdef, params, batch_stats)
        model.train()
        if with_gradients:
            grads, stages = nnx.grad(_loss, has_aux=True)(model, x, y)
            grads = nnx.to_pure_dict(grads)
        else:
            grads, stages = None, _loss(model, x, y)[1]
        return grads, (nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), stages)

    return jax.jit(step)


@functools.lru_cache(maxsize=JIT_CACHE_SIZE)
def _sgd(learning_rate: float, momentum: float, weight_decay: float) -> optax.GradientTransformation:
    """One chain per setting: the optimizer's graph definition then repeats, and nnx.jit compiles once."""
    return torch_sgd(learning_rate, momentum, weight_decay)


@nnx.jit
def _sgd_step(model: flax_nnx.ResNet, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> None:
    grads, _ = nnx.grad(_loss, has_aux=True)(model, x, y)
    optimizer.update(model, grads)


def pure_variables(model: flax_nnx.ResNet) -> Variables:
    """An NNX ResNet's state as linen variables: its Params under ``params``, its BatchStats under
    ``batch_stats``, as pure dicts of the same arrays (nothing checked)."""
    return {
        "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
    }


@dataclasses.dataclass
class NnxSide:
    """A ``resnet_flax.nnx.ResNet`` holding the weights, committed to one JAX device."""

    model: flax_nnx.ResNet

    @classmethod
    def from_torch(cls, torch_model: torch.nn.Module, mode: Mode, device: str, fused_bn: bool) -> NnxSide:
        """The torch model's weights in a ``resnet_flax.nnx`` model of the architecture they describe, in
        ``mode``'s dtypes and precision (``fused_bn``: the fused train-mode BatchNorm), built abstractly
        and filled by ``torch_to_nnx``."""
        options = dict(dtype=mode.jax_dtype, param_dtype=mode.jax_param_dtype, precision=mode.jax_precision)
        target = nnx_model(arch_of(torch_model), **options)
        model = torch_to_nnx(torch_model.state_dict(), target=target)
        # Committed to the run's device once, so every jitted call runs there.
        nnx.update(model, jax.device_put(nnx.state(model), jax_device(device)))
        return cls(flax_nnx.fused(model) if fused_bn else model)

    @property
    def variables(self) -> Variables:
        """The model's state as linen variables (``pure_variables``)."""
        return pure_variables(self.model)

    def eval_stages(self, x: jax.Array) -> Stages:
        """Every stage's eval-mode output (the model itself is left in its mode)."""
        graphdef, state = nnx.split(self.model)
        return _jitted_eval(graphdef)(state, x)

    def train_step(
        self, params: Any, batch_stats: Any, x: jax.Array, y: jax.Array, with_gradients: bool
    ) -> tuple[Any | None, Any, Stages]:
        """One train-mode call of the model merged from ``params`` and ``batch_stats``: (gradients or None,
        updated batch_stats, stage outputs), pure dicts."""
        graphdef = nnx.split(self.model, nnx.Param, nnx.BatchStat)[0]
        grads, (batch_stats, stages) = _jitted_train(graphdef, with_gradients)(params, batch_stats, x, y)
        return grads, batch_stats, stages

    def sgd_steps(
        self, batches: Sequence[tuple[jax.Array, jax.Array]], learning_rate: float, momentum: float, weight_decay: float
    ) -> Variables:
        """The variables of a copy of the model after one train-mode step per (x, y) batch:
        ``nnx.Optimizer`` over ``parity.checks.optim.torch_sgd``, one ``nnx.jit`` step."""
        model = nnx.clone(self.model)
        model.train()
        optimizer = nnx.Optimizer(model, _sgd(learning_rate, momentum, weight_decay), wrt=nnx.Param)
        for x, y in batches:
            _sgd_step(model, optimizer, x, y)
        return pure_variables(model)
