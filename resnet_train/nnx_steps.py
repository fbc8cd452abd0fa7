"""The train state and step functions for ``--api nnx``: the resnet_flax.nnx model and nnx.Optimizer.

The state holds the model's and the optimizer's state as pytrees and their graph definitions as
static fields; a step merges them inside the loop's ``jax.jit`` (the split/merge form: no graph
traversal in Python per call, unlike ``nnx.jit``) and splits them again. ``params`` and ``batch_stats`` are the linen
trees (an NNX model's state has the linen paths), so checkpoints, the export and
``checkpoint.load_variables`` read the same as for ``--api linen``; the step does what the linen
step does (same augmentation keys, loss, optax chain and non-finite guard), through NNX.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from resnet_flax import nnx as flax_nnx
from resnet_flax.model import init_key
from resnet_flax.preprocess import normalize

from .config import TrainConfig
from .finetune import with_init
from .optim import keep_frozen, trainable
from .steps import (
    INIT_STREAM,
    eval_metrics,
    guarded_update,
    model_options,
    train_inputs,
    train_loss,
    train_metrics,
)

Array = jax.Array


class NnxTrainState(struct.PyTreeNode):
    """Everything a step changes (the fields ``steps.TrainState`` has), plus the graphs to merge into."""

    step: Array
    params: Any  # the model's nnx.Param state as a linen tree
    batch_stats: Any  # its nnx.BatchStat state, likewise
    opt_state: Any  # the nnx.Optimizer's state (its step and the optax state), arrays only
    skipped: Array  # updates left out because the loss, gradients or update were not finite
    model_def: nnx.GraphDef = struct.field(pytree_node=False)  # the model, in train mode
    optimizer_def: nnx.GraphDef = struct.field(pytree_node=False)
    mean: tuple[float, ...] = struct.field(pytree_node=False)  # dataset statistics for normalize()
    std: tuple[float, ...] = struct.field(pytree_node=False)

    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}

    def model(self) -> flax_nnx.ResNet:
        """The model holding this state (inside a jitted function, a traced one)."""
        return nnx.merge(self.model_def, self.params, self.batch_stats)


def build_model(
    config: TrainConfig, num_classes: int, dtype: Any = None, precision: Any = None, *, rngs: nnx.Rngs
) -> flax_nnx.ResNet:
    """The NNX ResNet a config describes (fused train-mode BatchNorm if asked), in config.dtype unless
    dtype overrides it."""
    model = flax_nnx.build(config.arch, **model_options(config, num_classes, dtype, precision), rngs=rngs)
    return flax_nnx.fused(model, two_pass=config.bn_two_pass) if config.fused_bn else model


def create_train_state(
    config: TrainConfig,
    num_classes: int,
    tx: optax.GradientTransformation,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    init: dict[str, Any] | None = None,
) -> NnxTrainState:
    """A fresh state at step 0: the model initialised (under nnx.jit) from (seed, INIT_STREAM), float32 params,
    then every module ``init`` (variables from ``--init-from``) holds taken from it."""
    key = jax.random.fold_in(init_key(config.seed), INIT_STREAM)
    model = nnx.jit(lambda k: build_model(config, num_classes, rngs=nnx.Rngs(k)))(key)
    if init is not None:
        _, params, batch_stats = _split(model)
        variables = with_init({"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(batch_stats)}, init)
        nnx.replace_by_pure_dict(params, variables["params"])
        nnx.replace_by_pure_dict(batch_stats, variables["batch_stats"])
        nnx.update(model, params, batch_stats)
    return state_of(model, tx, mean, std)


def state_of(
    model: flax_nnx.ResNet, tx: optax.GradientTransformation, mean: tuple[float, ...], std: tuple[float, ...]
) -> NnxTrainState:
    """The step-0 state that trains ``model`` (put in train mode) with ``nnx.Optimizer(model, tx)``."""
    model.train()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    model_def, params, batch_stats = _split(model)
    optimizer_def, opt_state = nnx.split(optimizer)
    return NnxTrainState(
        step=jnp.zeros((), jnp.int32),
        params=nnx.to_pure_dict(params),
        batch_stats=nnx.to_pure_dict(batch_stats),
        opt_state=nnx.as_pure(opt_state),
        skipped=jnp.zeros((), jnp.int32),
        model_def=model_def,
        optimizer_def=optimizer_def,
        mean=tuple(mean),
        std=tuple(std),
    )


def _split(model: flax_nnx.ResNet) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """The model's graph, its parameters and its BatchNorm statistics."""
    # Two filters give three parts (nnx.split's type says only "two or more").
    return cast(tuple[nnx.GraphDef, nnx.State, nnx.State], nnx.split(model, nnx.Param, nnx.BatchStat))


def _logits(model: flax_nnx.ResNet, x: Array) -> Array:
    """The model's logits (its call gives every stage's output only when asked to)."""
    return cast(Array, model(x))


def train_step(
    state: NnxTrainState, images_u8: Array, labels: Array, config: TrainConfig
) -> tuple[NnxTrainState, dict[str, Array]]:
    """One optimizer step, as ``steps.train_step``: the model updates its BatchNorm statistics in place in
    its train-mode call (under ``--freeze`` it runs in eval mode), ``nnx.Optimizer.update`` its parameters
    (frozen ones kept as they were); a non-finite update is not applied."""
    x = train_inputs(state, images_u8, config)
    model = state.model()
    if config.running_bn:  # --freeze: BatchNorm on its running statistics, which stay as they are
        model.eval()
    optimizer = nnx.merge(state.optimizer_def, state.opt_state)

    def loss_fn(model: flax_nnx.ResNet) -> tuple[Array, Array]:
        logits = _logits(model, x)
        return train_loss(logits, labels, state.step, config), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    _, param_state, stats_state = _split(model)
    params = keep_frozen(config, nnx.to_pure_dict(param_state), state.params)
    batch_stats = nnx.to_pure_dict(stats_state)
    opt_state = nnx.as_pure(nnx.state(optimizer))
    grads = trainable(config, nnx.to_pure_dict(grads))
    new_state, finite = guarded_update(state, loss, grads, params, batch_stats, opt_state)
    return new_state, train_metrics(loss, logits, labels, finite)


def eval_step(state: NnxTrainState, images_u8: Array, labels: Array, mask: Array) -> dict[str, Array]:
    """Summed loss (no smoothing), top-1 and top-5 correct counts and count over the real (mask=True) images."""
    model = state.model()
    model.eval()
    return eval_metrics(_logits(model, normalize(images_u8, state.mean, state.std)), labels, mask)


def eval_forward(
    config: TrainConfig, num_classes: int, dtype: Any = None, precision: Any = None
) -> Callable[[dict[str, Any], Array], Array]:
    """(variables, normalised NHWC images) -> eval-mode logits of the NNX model a config trains."""
    model = nnx.eval_shape(lambda: build_model(config, num_classes, dtype, precision, rngs=nnx.Rngs(0)))
    model.eval()
    model_def = _split(model)[0]
    return lambda variables, x: _logits(nnx.merge(model_def, variables["params"], variables["batch_stats"]), x)
