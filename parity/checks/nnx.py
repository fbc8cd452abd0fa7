"""The Flax side of the parity checks for ``resnet_flax.nnx`` models.

Eval and train-mode calls are jitted over the model's split state (``nnx.split`` outside,
``nnx.merge`` inside ``jax.jit``), cached per graph definition as the linen checks cache per
model; SGD steps run ``nnx.Optimizer`` over the same ``torch_sgd`` chain under ``nnx.jit``.
Results come back as linen-style trees, so ``parity.conversion.convert`` compares them with torch's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx

from resnet_flax import nnx as flax_nnx

from ..conversion.nnx import nnx_to_linen
from .optim import torch_sgd
from .pairs import JIT_CACHE_SIZE


def _loss(model: flax_nnx.ResNet, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Any]:
    """F.cross_entropy's mean softmax cross-entropy of a forward pass, and every stage's output."""
    stages: Any = model(x, return_stages=True)
    return optax.softmax_cross_entropy_with_integer_labels(stages["fc"], y).mean(), stages


@functools.lru_cache(maxsize=JIT_CACHE_SIZE)
def _jitted_eval(graphdef: nnx.GraphDef) -> Callable[..., dict[str, jax.Array]]:
    def forward(state: Any, x: jax.Array) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, state)
        model.eval()
        return model(x, return_stages=True)

    return jax.jit(forward)


def eval_stages(model: flax_nnx.ResNet, x: jax.Array) -> dict[str, jax.Array]:
    """Every stage's eval-mode output (the model itself is left in its mode)."""
    graphdef, state = nnx.split(model)
    return _jitted_eval(graphdef)(state, x)


@functools.lru_cache(maxsize=JIT_CACHE_SIZE)
def jitted_train(graphdef: nnx.GraphDef, with_gradients: bool) -> Callable[..., tuple[Any, Any]]:
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


def train_graphdef(model: flax_nnx.ResNet) -> nnx.GraphDef:
    """The graph definition ``jitted_train`` merges params and batch_stats into."""
    return nnx.split(model, nnx.Param, nnx.BatchStat)[0]


@functools.lru_cache(maxsize=JIT_CACHE_SIZE)
def _sgd(learning_rate: float, momentum: float, weight_decay: float) -> optax.GradientTransformation:
    """One chain per setting: the optimizer's graph definition then repeats, and nnx.jit compiles once."""
    return torch_sgd(learning_rate, momentum, weight_decay)


@nnx.jit
def _sgd_step(model: flax_nnx.ResNet, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> None:
    grads, _ = nnx.grad(_loss, has_aux=True)(model, x, y)
    optimizer.update(model, grads)


def sgd_steps(
    model: flax_nnx.ResNet,
    batches: list[tuple[jax.Array, jax.Array]],
    learning_rate: float,
    momentum: float,
    weight_decay: float,
) -> dict[str, Any]:
    """A copy of the model after one train-mode SGD step per (x, y) batch, as linen variables.

    ``nnx.Optimizer`` over ``parity.checks.optim.torch_sgd``, one ``nnx.jit`` step; ``model`` is unchanged.
    """
    model = nnx.clone(model)
    model.train()
    optimizer = nnx.Optimizer(model, _sgd(learning_rate, momentum, weight_decay), wrt=nnx.Param)
    for x, y in batches:
        _sgd_step(model, optimizer, x, y)
    return nnx_to_linen(model)
