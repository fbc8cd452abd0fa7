"""PyTorch state dicts <-> Flax variable trees, by one rule over names for every depth.

The module path is shared (``conv2_x.0.shortcut.1`` is ``('conv2_x', '0', 'shortcut', '1')``);
each leaf kind has one name on either side and one transform (``LEAF_RULES``).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import warnings
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import traverse_util
from flax import linen as nn

from resnet_flax.layers import COUNTER_DTYPE

from .arch import ArchSpec, infer_arch
from .names import LAYOUTS, SEED, TORCHVISION, detect_layout, seed_to_torchvision, torchvision_to_seed

Variables = dict[str, Any]
StateDict = "collections.OrderedDict[str, torch.Tensor]"


class ConversionError(ValueError):
    """A checkpoint does not fit the model: every missing, unexpected or misshapen key is named."""


@dataclasses.dataclass(frozen=True)
class LeafRule:
    """One kind of leaf: its names on both sides and the permutation between layouts."""

    torch_name: str
    flax_name: str
    collection: str
    ndim: int
    perm: tuple[int, ...] | None  # torch axes -> flax axes; None for a vector kept as it is

    def inverse_perm(self) -> tuple[int, ...] | None:
        return None if self.perm is None else tuple(int(i) for i in np.argsort(self.perm))


LEAF_RULES: tuple[LeafRule, ...] = (
    # Conv2d weight: torch OIHW, Flax HWIO.
    LeafRule("weight", "kernel", "params", 4, (2, 3, 1, 0)),
    # Linear weight: torch (out, in), Flax (in, out).
    LeafRule("weight", "kernel", "params", 2, (1, 0)),
    LeafRule("weight", "scale", "params", 1, None),
    LeafRule("bias", "bias", "params", 1, None),
    LeafRule("running_mean", "mean", "batch_stats", 1, None),
    LeafRule("running_var", "var", "batch_stats", 1, None),
    # torch keeps an int64 scalar counter; Flax keeps it as COUNTER_DTYPE (int32 unless x64 is on).
    LeafRule("num_batches_tracked", "num_batches_tracked", "batch_stats", 0, None),
)
_BY_TORCH = {(r.torch_name, r.ndim): r for r in LEAF_RULES}
_BY_FLAX = {(r.collection, r.flax_name, r.ndim): r for r in LEAF_RULES}
_COUNTER = "num_batches_tracked"
_BN_BUFFERS = ("running_mean", "running_var", _COUNTER)
_PROBE_INPUT = (1, 32, 32, 3)  # smallest NHWC input every stem reduces to 1x1; shapes only


def _natural_key(key: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _as_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """A state dict, an nn.Module, or (name, tensor) pairs -> {name: tensor}."""
    if isinstance(obj, torch.nn.Module):
        return dict(obj.state_dict())
    items = obj.items() if isinstance(obj, Mapping) else obj
    try:
        pairs = list(items)
    except TypeError:
        raise TypeError(
            f"expected a state dict, an nn.Module or (name, tensor) pairs, got {type(obj).__name__}"
        ) from None
    out = {}
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
            raise TypeError(f"expected (name, tensor) pairs, got {pair!r:.80}")
        name, value = pair
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        out[name] = value
    return out


def _torch_leaf_to_jax(rule: LeafRule, t: torch.Tensor, dtype: Any) -> jax.Array:
    t = t.detach().cpu()
    if rule.torch_name == _COUNTER:
        return jnp.asarray(int(t), COUNTER_DTYPE)
    if dtype is not None:
        t = t.to(dtype)
    x = jax.dlpack.from_dlpack(t.contiguous())
    # Transpose (or copy) so the result never aliases the torch tensor's memory.
    return jnp.transpose(x, rule.perm) if rule.perm is not None else jnp.array(x, copy=True)


def _jax_leaf_to_torch(rule: LeafRule, x: Any, dtype: Any) -> torch.Tensor:
    if rule.torch_name == _COUNTER:
        return torch.tensor(int(x), dtype=torch.int64)
    t = torch.from_dlpack(jnp.asarray(x))
    if rule.perm is not None:
        t = t.permute(rule.inverse_perm())
    # clone: the result owns its memory (jax buffers may be donated or freed later).
    t = t.clone(memory_format=torch.contiguous_format)
    return t if dtype is None else t.to(dtype)


def _expected_shapes(model: nn.Module) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{flax path: shape} of a model's variables, without computing them."""
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(_PROBE_INPUT), train=False))
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(tree).items()}


def _flax_path(rule: LeafRule, module: str) -> tuple[str, ...]:
    return (rule.collection, *module.split("."), rule.flax_name)


def _torch_key(path: tuple[str, ...], shape: tuple[int, ...]) -> str:
    """The seed key a Flax path stands for (used to name keys in errors)."""
    collection, *module, leaf = path
    rule = _BY_FLAX.get((collection, leaf, len(shape)))
    return ".".join([*module, rule.torch_name if rule else leaf])


def _check(
    got: Mapping[tuple[str, ...], tuple[int, ...]],
    expected: Mapping[tuple[str, ...], tuple[int, ...]],
    unknown: list[str],
    what: str,
) -> None:
    missing = sorted((_torch_key(p, s) for p, s in expected.items() if p not in got), key=_natural_key)
    unexpected = sorted(unknown + [_torch_key(p, s) for p, s in got.items() if p not in expected], key=_natural_key)
    misshapen = sorted(
        (
            f"{_torch_key(p, s)}: got {_torch_shape(p, got[p])}, expected {_torch_shape(p, s)}"
            for p, s in expected.items()
            if p in got and tuple(got[p]) != tuple(s)
        ),
        key=_natural_key,
    )
    if missing or unexpected or misshapen:
        lines = [f"checkpoint does not fit {what}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", misshapen)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise ConversionError("\n".join(lines))


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    rule = _BY_FLAX.get((path[0], path[-1], len(shape)))
    inv = rule.inverse_perm() if rule else None
    return tuple(shape) if inv is None else tuple(shape[i] for i in inv)


def torch_to_flax(obj: Any, target: nn.Module | None = None, *, dtype: Any = None) -> Variables:
    """A PyTorch ResNet's weights -> ``{'params': ..., 'batch_stats': ...}`` for resnet_flax.

    ``obj`` is a state dict, an ``nn.Module``, or ``named_parameters()`` (plus ``named_buffers()``)
    pairs, with the seed's or torchvision's key names. The result is checked against ``target``'s
    variable tree (or, without ``target``, the architecture read from the keys); any missing,
    unexpected or misshapen key raises ConversionError naming all of them. dtypes are kept
    unless ``dtype`` (a torch dtype) asks for a cast of the floating-point tensors.
    """
    sd = _as_state_dict(obj)
    if detect_layout(list(sd)) == TORCHVISION:
        sd = {torchvision_to_seed(k): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items()}
    if not any(k.endswith(_BN_BUFFERS) for k in sd):
        fresh = _fresh_batch_stats(sd)
        if fresh:
            warnings.warn(
                "no BatchNorm buffers given (named_parameters() alone?): running statistics take the "
                "fresh defaults mean 0, var 1, num_batches_tracked 0",
                stacklevel=2,
            )
            sd.update(fresh)

    converted_shapes: dict[tuple[str, ...], tuple[int, ...]] = {}
    rules: dict[tuple[str, ...], tuple[LeafRule, torch.Tensor]] = {}
    unknown = []
    for key, t in sd.items():
        module, _, leaf = key.rpartition(".")
        rule = _BY_TORCH.get((leaf, t.dim()))
        if rule is None or not module:
            unknown.append(key)
            continue
        path = _flax_path(rule, module)
        shape = tuple(t.shape) if rule.perm is None else tuple(t.shape[i] for i in rule.perm)
        converted_shapes[path] = shape
        rules[path] = (rule, t)

    if target is None:
        try:
            spec = infer_arch({k: tuple(v.shape) for k, v in sd.items()})
        except ValueError as e:
            raise ConversionError(str(e)) from None
        target, what = spec.flax_model(), spec.describe()
    else:
        what = type(target).__name__
    _check(converted_shapes, _expected_shapes(target), unknown, what)

    if not jax.config.jax_enable_x64:
        wide = [k for k, v in sd.items() if v.dtype == torch.float64 and (dtype is None or dtype == torch.float64)]
        if wide:
            raise ConversionError(
                f"{len(wide)} float64 tensors (e.g. {wide[0]}) need jax.config.update('jax_enable_x64', True) "
                "to stay float64, or pass dtype=torch.float32 to cast them"
            )
    flat = {path: _torch_leaf_to_jax(rule, t, dtype if t.is_floating_point() else None) for path, (rule, t) in rules.items()}
    return traverse_util.unflatten_dict(flat)


def _fresh_batch_stats(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Default BatchNorm buffers (mean 0, var 1, counter 0) for every 1-D ``weight`` in sd."""
    fresh = {}
    for key, t in sd.items():
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and t.dim() == 1:
            fresh[f"{module}.running_mean"] = torch.zeros_like(t)
            fresh[f"{module}.running_var"] = torch.ones_like(t)
            fresh[f"{module}.{_COUNTER}"] = torch.tensor(0, dtype=torch.int64)
    return fresh


def flax_to_torch(variables: Mapping[str, Any], layout: str = SEED, *, dtype: Any = None) -> StateDict:
    """resnet_flax variables -> an OrderedDict state dict that ``load_state_dict(strict=True)`` accepts.

    ``layout="seed"`` gives resnet_torch's keys, ``layout="torchvision"`` torchvision's. The tree is
    checked against the architecture it describes first; nothing half-converted is returned.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ConversionError("expected Flax variables {'params': ..., 'batch_stats': ...}")
    flat = traverse_util.flatten_dict({k: variables[k] for k in ("params", "batch_stats") if k in variables})
    shapes = {path: tuple(np.shape(x)) for path, x in flat.items()}
    torch_shapes = {}
    for path, shape in shapes.items():
        rule = _BY_FLAX.get((path[0], path[-1], len(shape)))
        if rule is not None:
            torch_shapes[_torch_key(path, shape)] = _torch_shape(path, shape)
    try:
        spec = infer_arch(torch_shapes)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    unknown = [_torch_key(p, s) for p, s in shapes.items() if _BY_FLAX.get((p[0], p[-1], len(s))) is None]
    known = {p: s for p, s in shapes.items() if _BY_FLAX.get((p[0], p[-1], len(s))) is not None}
    _check(known, _expected_shapes(spec.flax_model()), unknown, spec.describe())

    rename = seed_to_torchvision if layout == TORCHVISION else (lambda k: k)
    out = {}
    for path, x in flat.items():
        rule = _BY_FLAX[(path[0], path[-1], np.ndim(x))]
        cast = dtype if jnp.issubdtype(jnp.result_type(x), jnp.floating) else None
        out[rename(_torch_key(path, np.shape(x)))] = _jax_leaf_to_torch(rule, x, cast)
    return collections.OrderedDict(sorted(out.items(), key=lambda kv: _natural_key(_order_key(kv[0]))))


_LEAF_ORDER = {name: i for i, name in enumerate(("weight", "bias", "running_mean", "running_var", _COUNTER))}


def _order_key(key: str) -> str:
    """Sort key that puts a module's leaves in torch's registration order."""
    module, _, leaf = key.rpartition(".")
    return f"{module}.{_LEAF_ORDER.get(leaf, 9)}"


def arch_of(obj: Any) -> ArchSpec:
    """The architecture a state dict, nn.Module, pairs or Flax variables tree describes."""
    if isinstance(obj, Mapping) and "params" in obj:
        flat = traverse_util.flatten_dict(obj["params"])
        return infer_arch({_torch_key(("params", *p), np.shape(x)): _torch_shape(("params", *p), np.shape(x)) for p, x in flat.items()})
    sd = _as_state_dict(obj)
    if detect_layout(list(sd)) == TORCHVISION:
        sd = {torchvision_to_seed(k): v for k, v in sd.items()}
    return infer_arch({k: tuple(v.shape) for k, v in sd.items()})
