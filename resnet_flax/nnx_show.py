"""A Flax NNX ResNet shown the seed's three ways, as ``resnet_flax.show`` shows the linen one.

Nothing is computed: the model is built with ``nnx.eval_shape`` and ``nnx.tabulate`` traces it
inside ``jax.eval_shape``, so shapes and counts come from abstract values.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_arch import IN_CHANNELS

from .nnx import ResNet
from .nnx_layers import Sequential
from .show import (
    CONSOLE,
    DEFAULT_INPUT_HW,
    ROOT_NAME,
    TABLE_DEPTH,
    columns,
    layer_name,
    module_order,
    parameter_rows,
    setting,
)


def _probe(model: ResNet, input_hw: tuple[int, int]) -> jax.Array:
    """One NHWC image; only its shape and dtype matter, every use is traced."""
    return jnp.zeros((1, *input_hw, IN_CHANNELS), model.dtype)


def layer_table(model: ResNet, input_hw: tuple[int, int] = DEFAULT_INPUT_HW, depth: int = TABLE_DEPTH) -> str:
    """``nnx.tabulate``'s table for one NHWC image in eval mode: each module's output shape and variables.

    Its own total counts ``BatchStat`` too; the last line gives the ``Param`` total, the number
    torchinfo calls "Total params".
    """
    graphdef, state = nnx.split(nnx.view(model, use_running_average=True))
    tables = []

    def trace(state: Any) -> jax.Array:
        view = nnx.merge(graphdef, state)
        tables.append(nnx.tabulate(view, _probe(model, input_hw), depth=depth, console_kwargs=CONSOLE))
        return jnp.zeros(())

    jax.eval_shape(trace, state)
    return f"{tables[0].strip()}\nTotal params: {count_params(model):,} (nnx.Param, as torch counts them)"


def module_list(model: ResNet) -> str:
    """Every module of the model, one line each in module order: path, class and settings."""
    modules = {"/".join(map(str, path)): m for path, m in nnx.iter_modules(model)}
    return columns([(path or ROOT_NAME, _describe(modules[path])) for path in sorted(modules, key=module_order)])


def parameter_list(model: ResNet) -> str:
    """Every ``nnx.Param`` with its shape and dtype, and the total count."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return parameter_rows({"/".join(map(str, path)): v.get_value() for path, v in flat})


def count_params(model: ResNet) -> int:
    """The number of trainable values (``nnx.Param``; ``BatchStat`` excluded)."""
    return sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def _setting(value: Any) -> str | None:
    """``show.setting``, and a class (the block type) by name."""
    return value.__name__ if isinstance(value, type) else setting(value)


def _describe(m: nnx.Module) -> str:
    """``Conv2d(in_channels=3, out_channels=64, ...)``: the settings a reader compares with torch."""
    if isinstance(m, Sequential):
        return f"Sequential({', '.join(layer_name(layer) for layer in m)})"
    settings = [
        f"{name}={text}"
        for name, value in vars(m).items()
        if not name.startswith("_") and (text := _setting(value)) is not None
    ]
    return f"{type(m).__name__}({', '.join(settings)})"
