"""resnet_flax under jax.jit: resnet-train's own train step (``resnet_train.steps.train_step``: loss,
gradients, the trainer's optimizer and its non-finite guard) on synthetic batches, with the fused
train-mode BatchNorm (or the plain mirror's), and inference with BatchNorm folded (or not)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

import resnet_flax
from resnet_arch import dtype_name
from resnet_data.transforms import IMAGENET_MEAN, IMAGENET_STD
from resnet_flax import preprocess
from resnet_flax.fold import fold
from resnet_flax.model import init_key
from resnet_train import steps
from resnet_train.config import TrainConfig
from resnet_train.data import steps_per_epoch
from resnet_train.feeds import IMAGENET_TRAIN_IMAGES
from resnet_train.optim import make_optimizer
from resnet_train.presets import preset_values

from .common import LEVERS, NO_LEVERS, PRESET, Settings, Step


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
def _inference(settings: Settings, folded: bool) -> tuple[Any, jax.stages.Wrapped]:
    """Eval variables (folded or not) and one jitted forward, shared by every batch size."""
    model, variables = _model_and_variables(settings)
    if folded:
        model, variables = fold(model, variables)
        variables = jax.device_put(variables, _device(settings))
    return variables, jax.jit(lambda v, x: model.apply(v, normalize(x, model.dtype), train=False))


def trainer_config(settings: Settings, fused_bn: bool = True, levers: str = NO_LEVERS) -> TrainConfig:
    """The `resnet-train --preset imagenet-resnet50 --dataset synthetic` run whose step a benchmark times: the
    preset's recipe (SGD with Nesterov momentum, weight decay on kernels, label smoothing) with the settings'
    model, batch, dtype and seed, and the speed levers named ``levers`` (a key of ``LEVERS``)."""
    values = preset_values(
        PRESET,
        dataset="synthetic",
        arch=settings.arch,
        small_stem=settings.small_stem,
        image_size=settings.size,
        batch_size=settings.batch,
        dtype=settings.dtype,
        fused_bn=fused_bn,
        seed=settings.seed,
        progress=False,
        export=False,
    )
    return TrainConfig(**{**values, **LEVERS[levers]})


def trainer_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """The trainer's optimizer for ``config``, its schedule spanning synthetic ImageNet-sized epochs."""
    return make_optimizer(config, steps_per_epoch(IMAGENET_TRAIN_IMAGES, config.batch_size))


def trainer_state(settings: Settings, config: TrainConfig) -> steps.TrainState:
    """The trainer's step-0 state of ``config``'s model from the benchmark's initial weights (a copy: the
    step donates its state, and the cached initial variables must survive it)."""
    _, variables = _model_and_variables(settings)
    model = steps.build_model(config, settings.num_classes)
    tx = trainer_optimizer(config)
    return steps.state_of(model, jax.tree.map(jnp.copy, variables), tx, IMAGENET_MEAN, IMAGENET_STD)


def make_train_step(config: TrainConfig, steps_per_call: int = 1) -> Any:
    """``resnet_train.steps.train_step`` for ``config`` under one jit: ``(state, images, labels) -> (state,
    metrics)``.

    The state is donated, so XLA updates it in place. With ``steps_per_call`` K > 1 one call runs K
    steps (``lax.scan``) over K stacked batches (images (K, N, H, W, C), labels (K, N)) and returns the
    last step's metrics: one dispatch for K steps.
    """
    step = functools.partial(steps.train_step, config=config)
    if steps_per_call == 1:
        return jax.jit(step, donate_argnums=0)

    def train_steps(state: steps.TrainState, images: jax.Array, labels: jax.Array) -> tuple[steps.TrainState, Any]:
        state, metrics = jax.lax.scan(lambda s, batch: step(s, *batch), state, (images, labels))
        return state, jax.tree.map(lambda m: m[-1], metrics)

    return jax.jit(train_steps, donate_argnums=0)


def train(settings: Settings, fused_bn: bool = True, steps_per_call: int = 1, levers: str = NO_LEVERS) -> Step:
    """resnet-train's train step on fixed synthetic batches; ``fused_bn`` trains the ``resnet_flax.fused``
    model (the trainer's default), else the plain mirror; ``levers`` adds speed levers (a key of LEVERS)."""
    config = trainer_config(settings, fused_bn, levers)
    with jax.default_device(_device(settings)):
        images, labels = _data(settings, settings.batch * steps_per_call)
        if steps_per_call > 1:
            images = images.reshape(steps_per_call, settings.batch, *images.shape[1:])
            labels = labels.reshape(steps_per_call, settings.batch)
        holder: dict[str, Any] = {"state": trainer_state(settings, config), "metrics": None}
    step_fn = make_train_step(config, steps_per_call)

    def run() -> None:
        holder["state"], holder["metrics"] = step_fn(holder["state"], images, labels)

    impl = ("resnet_flax" if fused_bn else "resnet_flax_plain") + (f"+{levers}" if levers else "")
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
