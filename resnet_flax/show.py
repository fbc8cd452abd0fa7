"""A Flax ResNet shown the seed tutorial's three ways (docs/design.md): layer table, modules, named parameters.

Nothing is computed: Flax traces the model with ``jax.eval_shape`` for shapes and counts.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from resnet_arch import IN_CHANNELS

from .layers import Sequential

# The seed's summary(model, (3, 224, 224)).
DEFAULT_INPUT_HW = (224, 224)
# Table rows down to the blocks (conv2_x/0), the depth resnet_torch.show's table uses too.
TABLE_DEPTH = 2
ROOT_NAME = "(model)"
# Plain text: no terminal colour codes, wide enough for the shape columns.
CONSOLE = {"force_terminal": False, "width": 160}


def _probe(model: nn.Module, input_hw: tuple[int, int]) -> jax.Array:
    """One NHWC image; only its shape and dtype matter, every use is traced with eval_shape."""
    return jnp.zeros((1, *input_hw, IN_CHANNELS), getattr(model, "dtype", jnp.float32))


def layer_table(model: nn.Module, input_hw: tuple[int, int] = DEFAULT_INPUT_HW, depth: int = TABLE_DEPTH) -> str:
    """``nn.tabulate``'s table for one NHWC image: each module's output shape and variables.

    Its own total counts ``batch_stats`` too; the last line gives the ``params`` total, the
    number torchinfo calls "Total params".
    """
    tabulate = nn.tabulate(model, jax.random.key(0), depth=depth, console_kwargs=CONSOLE)
    table = tabulate(_probe(model, input_hw), train=False).strip()
    return f"{table}\nTotal params: {count_params(model, input_hw):,} (params collection, as torch counts them)"


def module_list(model: nn.Module, input_hw: tuple[int, int] = DEFAULT_INPUT_HW) -> str:
    """Every module the model calls, one line each: path, class and settings."""
    paths = model.module_paths(jax.random.key(0), _probe(model, input_hw), train=False)
    rows = [(path or ROOT_NAME, _describe(m)) for path, m in paths.items()]
    return columns(rows)


def parameter_list(model: nn.Module, input_hw: tuple[int, int] = DEFAULT_INPUT_HW) -> str:
    """Every leaf of the ``params`` collection with its shape and dtype, and the total count."""
    return parameter_rows(traverse_util.flatten_dict(_variables(model, input_hw)["params"], sep="/"))


def module_order(path: str) -> list[int | str]:
    """A sort key that puts paths in module order (conv4_x/2 before conv4_x/10), not string order."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def parameter_rows(flat: dict[str, Any]) -> str:
    """{path: array or shape-dtype} -> one line per leaf in module order, and the total count."""
    rows = [
        (path, f"{list(flat[path].shape)} {jnp.dtype(flat[path].dtype).name}")
        for path in sorted(flat, key=module_order)
    ]
    total = sum(leaf.size for leaf in flat.values())
    return f"{columns(rows)}\nTotal params: {total:,} in {len(flat)} tensors"


def count_params(model: nn.Module, input_hw: tuple[int, int] = DEFAULT_INPUT_HW) -> int:
    """The number of trainable values (the ``params`` collection; ``batch_stats`` excluded)."""
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(_variables(model, input_hw)["params"]))


def _variables(model: nn.Module, input_hw: tuple[int, int]) -> dict[str, Any]:
    """The variable tree as shapes and dtypes only."""
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), _probe(model, input_hw))


def _describe(m: nn.Module) -> str:
    """``Conv2d(in_channels=3, out_channels=64, ...)``: the settings a reader compares with torch."""
    if isinstance(m, Sequential):
        return f"Sequential({', '.join(layer_name(layer) for layer in m.layers)})"
    settings = [
        f"{f.name}={text}"
        for f in dataclasses.fields(m)
        if f.name not in ("parent", "name") and (text := setting(getattr(m, f.name))) is not None
    ]
    return f"{type(m).__name__}({', '.join(settings)})"


def layer_name(layer: Any) -> str:
    func = layer.func if isinstance(layer, functools.partial) else layer
    return getattr(func, "__name__", type(func).__name__)


def setting(value: Any) -> str | None:
    """A field's value as text, or None for fields that are functions, dtypes or unset."""
    if isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return repr(tuple(value))
    if isinstance(value, type) and issubclass(value, nn.Module):
        return value.__name__
    return None


def columns(rows: list[tuple[str, str]]) -> str:
    """Two left-aligned columns."""
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a.ljust(width)}  {b}" for a, b in rows)
