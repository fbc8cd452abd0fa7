"""resnet_flax.nnx: the train step (fused BatchNorm, nnx.Optimizer over the trainer's SGD chain) and
inference (BatchNorm folded), each jitted two ways: ``nnx.split``/``nnx.merge`` around ``jax.jit`` (the
state is a pytree, nothing is traversed per call) or ``nnx.jit`` (the model and optimizer passed as
objects, their graph split and merged in Python at every call).

The split form's train step is `resnet-train --api nnx`'s own (``resnet_train.nnx_steps.train_step``).
The ``nnx.jit`` form runs the forward, loss, gradients and optimizer update alone (no augmentation, label
smoothing or non-finite guard): a lighter workload than the split form's, so the two rows differ by that
work as well as by how they are jitted.

The model holds the linen benchmark's initial weights (converted), so both APIs run the same numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from parity.conversion.nnx import linen_to_nnx
from resnet_data.transforms import IMAGENET_MEAN, IMAGENET_STD
from resnet_flax import nnx as flax_nnx
from resnet_train import nnx_steps as trainer_steps

from . import flax_steps
from .common import Settings, Step

SPLIT, NNX_JIT = "split", "nnx.jit"
# How the NNX model is jitted -> its implementation name in the report.
IMPLS = {SPLIT: "resnet_flax_nnx", NNX_JIT: "resnet_flax_nnx+nnx.jit"}


def _model(settings: Settings) -> flax_nnx.ResNet:
    """A fresh NNX model (its own copies of the arrays, which a train step may donate) on the device."""
    linen, variables = flax_steps._model_and_variables(settings)
    with jax.default_device(flax_steps._device(settings)):
        return linen_to_nnx(jax.tree.map(jnp.copy, variables), dtype=linen.dtype)


def _loss(model: flax_nnx.ResNet, images: jax.Array, labels: jax.Array) -> jax.Array:
    logits = cast(jax.Array, model(flax_steps.normalize(images, model.dtype)))  # logits unless asked for stages
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def _update(model: flax_nnx.ResNet, optimizer: nnx.Optimizer, images: jax.Array, labels: jax.Array) -> jax.Array:
    """Forward, loss, gradients, the new BatchNorm statistics (in place) and the optimizer update."""
    loss, grads = nnx.value_and_grad(_loss)(model, images, labels)
    optimizer.update(model, grads)
    return loss


def _train_objects(settings: Settings) -> tuple[flax_nnx.ResNet, nnx.Optimizer, jax.Array, jax.Array]:
    """The fused model in train mode, its optimizer (the trainer's SGD chain) and a fixed batch."""
    model = flax_nnx.fused(_model(settings))
    model.train()
    tx = flax_steps.trainer_optimizer(flax_steps.trainer_config(settings))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    with jax.default_device(flax_steps._device(settings)):
        images, labels = flax_steps._data(settings, settings.batch)
    return model, optimizer, images, labels


def split_train(settings: Settings) -> tuple[jax.stages.Wrapped, Any, jax.Array, jax.Array]:
    """`resnet-train --api nnx`'s train step: ``(state, images, labels) -> (state, metrics)`` under jax.jit
    (state donated), its step-0 state from the benchmark's initial weights, and the batch."""
    config = flax_steps.trainer_config(settings)
    model = flax_nnx.fused(_model(settings))
    state = trainer_steps.state_of(model, flax_steps.trainer_optimizer(config), IMAGENET_MEAN, IMAGENET_STD)
    with jax.default_device(flax_steps._device(settings)):
        images, labels = flax_steps._data(settings, settings.batch)
    return jax.jit(functools.partial(trainer_steps.train_step, config=config), donate_argnums=0), state, images, labels


def train(settings: Settings, jit: str = SPLIT) -> Step:
    """A train step of the fused NNX model on fixed synthetic batches, jitted the ``jit`` way."""
    if jit == NNX_JIT:
        model, optimizer, images, labels = _train_objects(settings)
        step = nnx.jit(_update, donate_argnums=(0, 1))

        def run() -> None:
            step(model, optimizer, images, labels)

        return Step(IMPLS[jit], "train", run, lambda: jax.block_until_ready(nnx.state((model, optimizer))))

    jitted, state, images, labels = split_train(settings)
    holder = {"state": state}

    def run_split() -> None:
        holder["state"], _ = jitted(holder["state"], images, labels)

    return Step(IMPLS[jit], "train", run_split, lambda: jax.block_until_ready(holder["state"]))


def split_infer(settings: Settings, batch: int | None = None) -> tuple[jax.stages.Wrapped, Any, jax.Array]:
    """The split form of folded inference: ``(state, images) -> logits`` under jax.jit, the state and a batch."""
    model, images = _infer_objects(settings, batch)
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(flax_steps.normalize(x, model.dtype))), state, images


def _infer_objects(settings: Settings, batch: int | None) -> tuple[flax_nnx.ResNet, jax.Array]:
    """The model with BatchNorm folded (``resnet_flax.nnx.fold``) and a fixed batch."""
    model = flax_nnx.fold(_model(settings))
    with jax.default_device(flax_steps._device(settings)):
        images, _ = flax_steps._data(settings, batch or settings.batch)
    return model, images


def infer(settings: Settings, jit: str = SPLIT, batch: int | None = None) -> Step:
    """Eval-mode logits of the NNX model with BatchNorm folded, jitted the ``jit`` way."""
    forward: Callable[[], jax.Array]
    if jit == NNX_JIT:
        model, images = _infer_objects(settings, batch)
        call = nnx.jit(lambda m, x: m(flax_steps.normalize(x, m.dtype)))
        forward = functools.partial(call, model, images)
    else:
        jitted, state, images = split_infer(settings, batch)
        forward = functools.partial(jitted, state, images)
    outputs: list[jax.Array] = []

    def sync() -> None:
        jax.block_until_ready(outputs)
        outputs.clear()

    return Step(IMPLS[jit], "infer", lambda: outputs.append(forward()), sync)
