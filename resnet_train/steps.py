"""The train state and the pure step functions; the loop jits them with its shardings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import optax
from flax import struct

import resnet_flax
from resnet_arch import dtype_name
from resnet_flax.fused import fused
from resnet_flax.model import init_key
from resnet_flax.preprocess import normalize

from .augment import augment
from .config import TrainConfig
from .finetune import with_init
from .optim import keep_frozen, trainable

Array = jax.Array
# Keys for the two random streams, folded into the seed so they never overlap.
INIT_STREAM, AUGMENT_STREAM = 0, 1
# Augmentation keeps JAX's default PRNG (threefry): its bits do not depend on how the batch is sharded.
# The second accuracy evaluation reports: the label among the k highest logits (ImageNet's top-5).
TOP_K = 5


class TrainState(struct.PyTreeNode):
    """Everything a step changes; checkpointing this (plus the config) resumes a run exactly."""

    step: Array
    params: Any
    batch_stats: Any
    opt_state: Any
    skipped: Array  # updates left out because the loss, gradients or update were not finite
    apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    mean: tuple[float, ...] = struct.field(pytree_node=False)  # dataset statistics for normalize()
    std: tuple[float, ...] = struct.field(pytree_node=False)

    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}


def model_options(config: TrainConfig, num_classes: int, dtype: Any = None, precision: Any = None) -> dict[str, Any]:
    """The builder options a config fixes (either API): computing in config.dtype unless dtype overrides it."""
    return dict(
        num_classes=num_classes,
        small_stem=config.small_stem,
        zero_init_residual=config.zero_init_residual,
        dtype=dtype or jnp.dtype(dtype_name(config.dtype)),
        param_dtype=jnp.float32,
        precision=precision,
        matmul_1x1=config.matmul_1x1,
        space_to_depth_stem=config.space_to_depth_stem,
        max_pool_argmax_grad=config.max_pool_argmax_grad,
    )


def build_model(config: TrainConfig, num_classes: int, dtype: Any = None, precision: Any = None) -> resnet_flax.ResNet:
    """The Flax ResNet a config describes, computing in config.dtype unless dtype overrides it."""
    model = resnet_flax.build(config.arch, **model_options(config, num_classes, dtype, precision))
    return fused(model, two_pass=config.bn_two_pass) if config.fused_bn else model


def create_train_state(
    config: TrainConfig,
    num_classes: int,
    tx: optax.GradientTransformation,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    init: dict[str, Any] | None = None,
) -> TrainState:
    """A fresh state at step 0: the model initialised from (seed, INIT_STREAM), float32 params, then every
    module ``init`` (variables from ``--init-from``) holds taken from it."""
    model = build_model(config, num_classes)
    key = jax.random.fold_in(init_key(config.seed), INIT_STREAM)
    probe = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    variables = jax.jit(lambda k: model.init(k, probe, train=False))(key)
    return state_of(model, variables if init is None else with_init(variables, init), tx, mean, std)


def state_of(
    model: resnet_flax.ResNet,
    variables: dict[str, Any],
    tx: optax.GradientTransformation,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> TrainState:
    """The step-0 state that trains ``model`` from ``variables`` with ``tx``."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        skipped=jnp.zeros((), jnp.int32),
        apply_fn=model.apply,
        tx=tx,
        mean=tuple(mean),
        std=tuple(std),
    )


def _all_finite(*trees: Any) -> Array:
    """True when every floating-point leaf of the trees is finite."""
    leaves = [x for t in trees for x in jax.tree.leaves(t) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def guarded_update(
    state: Any, loss: Array, grads: Any, params: Any, batch_stats: Any, opt_state: Any
) -> tuple[Any, Array]:
    """(the state after one step, whether it was applied): the new parameters, statistics and optimizer
    state when they, the loss and the gradients are all finite, else the old ones, so a non-finite update
    is never applied; the step counter advances either way and ``skipped`` counts the updates left out."""
    finite = _all_finite(loss, grads, batch_stats, params, opt_state)

    def keep(new: Any, old: Any) -> Any:
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        batch_stats=keep(batch_stats, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state),
        skipped=state.skipped + jnp.logical_not(finite).astype(jnp.int32),
    )
    return new_state, finite


def cross_entropy(logits: Array, labels: Array, num_classes: int, label_smoothing: float) -> Array:
    """Per-example softmax cross-entropy against label-smoothed one-hot targets, in float32."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def train_inputs(state: Any, images_u8: Array, config: TrainConfig) -> Array:
    """The step's batch, augmented with keys from (seed, step) (so a resumed run repeats them) and normalised."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), AUGMENT_STREAM), state.step)
    return normalize(augment(key, images_u8, *config.device_augmentation), state.mean, state.std)


def train_loss(logits: Array, labels: Array, step: Array, config: TrainConfig) -> Array:
    """The mean label-smoothed cross-entropy (NaN at ``config.inject_nan_at_step``, for fault injection)."""
    loss = cross_entropy(logits, labels, logits.shape[-1], config.label_smoothing).mean()
    if config.inject_nan_at_step >= 0:
        loss = jnp.where(step == config.inject_nan_at_step, jnp.nan, loss)
    return loss


def train_metrics(loss: Array, logits: Array, labels: Array, finite: Array) -> dict[str, Array]:
    """What the loop reads after a step."""
    return {"loss": loss, "correct": jnp.sum(jnp.argmax(logits, -1) == labels), "finite": finite}


def train_step(
    state: TrainState, images_u8: Array, labels: Array, config: TrainConfig
) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer step on a uint8 NHWC batch: augment, normalise, forward in train mode (BatchNorm in eval
    mode under ``--freeze``), update (frozen parameters kept as they are).

    An update whose loss, gradients, new BatchNorm statistics, new parameters or new optimizer
    state are not all finite is not applied (the step counter still advances and ``skipped``
    counts it); ``metrics['finite']`` says which.
    """
    x = train_inputs(state, images_u8, config)

    def loss_fn(params: Any) -> tuple[Array, tuple[Array, Any]]:
        variables = {"params": params, "batch_stats": state.batch_stats}
        if config.running_bn:  # --freeze: BatchNorm on its running statistics, which stay as they are
            logits = state.apply_fn(variables, x, train=False)
            return train_loss(logits, labels, state.step, config), (logits, state.batch_stats)
        logits, updates = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
        return train_loss(logits, labels, state.step, config), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = keep_frozen(config, optax.apply_updates(state.params, updates), state.params)
    new_state, finite = guarded_update(state, loss, trainable(config, grads), params, batch_stats, opt_state)
    return new_state, train_metrics(loss, logits, labels, finite)


def eval_metrics(logits: Array, labels: Array, mask: Array) -> dict[str, Array]:
    """Summed loss (no smoothing), top-1 and top-5 correct counts and count over the real (mask=True) images."""
    loss = cross_entropy(logits, labels, logits.shape[-1], 0.0)
    weight = mask.astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == labels) & mask
    _, top5 = jax.lax.top_k(logits, min(TOP_K, logits.shape[-1]))
    correct5 = jnp.any(top5 == labels[:, None], axis=-1) & mask
    return {
        "loss": jnp.sum(loss * weight),
        "correct": jnp.sum(correct),
        "correct5": jnp.sum(correct5),
        "count": jnp.sum(mask),
    }


def eval_step(state: TrainState, images_u8: Array, labels: Array, mask: Array) -> dict[str, Array]:
    """Summed loss (no smoothing), top-1 and top-5 correct counts and count over the real (mask=True) images."""
    logits = state.apply_fn(state.variables(), normalize(images_u8, state.mean, state.std), train=False)
    return eval_metrics(logits, labels, mask)


def eval_forward(
    config: TrainConfig, num_classes: int, dtype: Any = None, precision: Any = None
) -> Callable[[dict[str, Any], Array], Array]:
    """(variables, normalised NHWC images) -> eval-mode logits of the model a config trains."""
    model = build_model(config, num_classes, dtype, precision)
    return lambda variables, x: cast(Array, model.apply(variables, x, train=False))
