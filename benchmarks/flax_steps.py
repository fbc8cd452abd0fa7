"""resnet_flax under jax.jit: one whole train step with the fused train-mode BatchNorm (or the plain
mirror's), and inference with BatchNorm folded (or not)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import resnet_flax
from parity.checks.optim import torch_sgd
from resnet_arch import dtype_name
from resnet_data.transforms import IMAGENET_MEAN, IMAGENET_STD
from resnet_flax import preprocess
from resnet_flax.fold import fold
from resnet_flax.fused import fused
from resnet_flax.model import init_key

from .common import LEARNING_RATE, MOMENTUM, WEIGHT_DECAY, Settings, Step


def _device(settings: Settings) -> jax.Device:
    platform = "gpu" if settings.device == "gpu" else "cpu"
    return jax.devices(platform)[0]


def normalize(images_u8: jax.Array, dtype: Any) -> jax.Array:
    """uint8 NHWC images -> ImageNet-normalised ``dtype`` images, on the device (fuses into the stem)."""
    return preprocess.normalize(images_u8, IMAGENET_MEAN, IMAGENET_STD).astype(dtype)


def _data(settings: Settings, batch: int) -> tuple[jax.Array, jax.Array]:
    """Random uint8 NHWC images and integer labels, made on the device."""
    key_x, key_y = jax.random.split(jax.random.key(settings.seed))
    shape = (batch, settings.size, settings.size, 3)
    images = jax.random.randint(key_x, shape, 0, 256, jnp.int32).astype(jnp.uint8)
    labels = jax.random.randint(key_y, (batch,), 0, settings.num_classes, jnp.int32)
    return images, labels


@functools.cache
def _model_and_variables(settings: Settings) -> tuple[resnet_flax.ResNet, Any]:
    """The model and its initial variables, made once per run (initialisation compiles too)."""
    model = resnet_flax.build(
        settings.arch,
        num_classes=settings.num_classes,
        small_stem=settings.small_stem,
        dtype=jnp.dtype(dtype_name(settings.dtype)),
    )
    with jax.default_device(_device(settings)):
        images, _ = _data(settings, 1)
        variables = jax.jit(lambda x: model.init(init_key(settings.seed + 1), normalize(x, model.dtype)))(images)
    return model, variables


@functools.cache
def _inference(settings: Settings, folded: bool) -> tuple[Any, Callable[[Any, jax.Array], jax.Array]]:
    """Eval variables (folded or not) and one jitted forward, shared by every batch size."""
    model, variables = _model_and_variables(settings)
    if folded:
        model, variables = fold(model, variables)
        variables = jax.device_put(variables, _device(settings))
    return variables, jax.jit(lambda v, x: model.apply(v, normalize(x, model.dtype), train=False))


def optimizer() -> optax.GradientTransformation:
    """torch.optim.SGD(lr, momentum, weight_decay) in optax, the chain the parity checks prove."""
    return torch_sgd(LEARNING_RATE, MOMENTUM, WEIGHT_DECAY)


def make_train_step(model: resnet_flax.ResNet, tx: optax.GradientTransformation, steps_per_call: int = 1) -> Any:
    """Forward, loss, gradients, optimizer update and new BatchNorm statistics, all under one jit.

    The state (params, batch_stats, opt_state) is donated, so XLA updates it in place. With
    ``steps_per_call`` K > 1 one call runs K steps (``lax.scan``) over K stacked batches
    (images (K, N, H, W, C), labels (K, N)) and returns the last loss: one dispatch for K steps.
    """

    def train_step(
        state: tuple[Any, Any, Any], images: jax.Array, labels: jax.Array
    ) -> tuple[tuple[Any, Any, Any], jax.Array]:
        params, batch_stats, opt_state = state

        def loss_fn(p: Any) -> tuple[jax.Array, Any]:
            x = normalize(images, model.dtype)
            logits, updates = model.apply(
                {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
            return loss, updates["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), new_stats, opt_state), loss

    if steps_per_call == 1:
        return jax.jit(train_step, donate_argnums=0)

    def train_steps(
        state: tuple[Any, Any, Any], images: jax.Array, labels: jax.Array
    ) -> tuple[tuple[Any, Any, Any], jax.Array]:
        state, losses = jax.lax.scan(lambda s, batch: train_step(s, *batch), state, (images, labels))
        return state, losses[-1]

    return jax.jit(train_steps, donate_argnums=0)


def train(settings: Settings, fused_bn: bool = True, steps_per_call: int = 1) -> Step:
    """A train step of resnet_flax on fixed synthetic batches; ``fused_bn`` trains the
    ``resnet_flax.fused`` model (what resnet-train uses), else the plain mirror."""
    model, variables = _model_and_variables(settings)
    model = fused(model) if fused_bn else model
    # A copy: the step donates its state, and the cached initial variables must survive it.
    variables = jax.tree.map(jnp.copy, variables)
    tx = optimizer()
    with jax.default_device(_device(settings)):
        images, labels = _data(settings, settings.batch * steps_per_call)
        if steps_per_call > 1:
            images = images.reshape(steps_per_call, settings.batch, *images.shape[1:])
            labels = labels.reshape(steps_per_call, settings.batch)
        holder = {"state": (variables["params"], variables["batch_stats"], tx.init(variables["params"])), "loss": None}
    step_fn = make_train_step(model, tx, steps_per_call)

    def run() -> None:
        holder["state"], holder["loss"] = step_fn(holder["state"], images, labels)

    impl = "resnet_flax" if fused_bn else "resnet_flax_plain"
    return Step(impl, "train", run, lambda: jax.block_until_ready(holder["state"]), steps_per_call)


def infer(settings: Settings, folded: bool = True, batch: int | None = None) -> Step:
    """Eval-mode logits of resnet_flax; ``folded`` folds BatchNorm into the convolutions first."""
    variables, forward = _inference(settings, folded)
    with jax.default_device(_device(settings)):
        images, _ = _data(settings, batch or settings.batch)
    outputs: list[jax.Array] = []

    def run() -> None:
        outputs.append(forward(variables, images))

    def sync() -> None:
        jax.block_until_ready(outputs)
        outputs.clear()

    return Step("resnet_flax" if folded else "resnet_flax_plain", "infer", run, sync)
