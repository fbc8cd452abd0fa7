"""PyTorch state dicts <-> Flax variable trees, by one rule over names for every depth.

The module path is shared (``conv2_x.0.shortcut.1`` is ``('conv2_x', '0', 'shortcut', '1')``);
each leaf kind has one name on either side and one transform (``LEAF_RULES``). Both directions
check the whole tree against the shapes ``ArchSpec.torch_shapes`` gives before converting a
single leaf, so nothing half-converted is ever returned.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
import torch
from flax import traverse_util

from resnet_flax.layers import COUNTER_DTYPE
from resnet_flax.model import ResNet as FlaxResNet

from .arch import ArchSpec, infer_arch
from .arrays import (
    aligned_empty,
    numpy_dtype,
    numpy_to_torch,
    one_torch_thread,
    permuted_copy,
    to_jax,
    torch_dtype,
    torch_views,
)
from .names import LAYOUTS, SEED, TORCHVISION, detect_layout, seed_to_torchvision, torchvision_to_seed

Variables = dict[str, Any]
Shapes = Mapping[str, tuple[int, ...]]


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
        """The permutation from Flax axes back to torch axes."""
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
    # torch keeps an int64 scalar counter; Flax keeps it as COUNTER_DTYPE (int32).
    LeafRule("num_batches_tracked", "num_batches_tracked", "batch_stats", 0, None),
)
_BY_TORCH = {(r.torch_name, r.ndim): r for r in LEAF_RULES}
_BY_FLAX = {(r.collection, r.flax_name, r.ndim): r for r in LEAF_RULES}
_COLLECTIONS = ("params", "batch_stats")
_COUNTER = "num_batches_tracked"
_BN_BUFFERS = ("running_mean", "running_var", _COUNTER)
_TORCH_COUNTER_DTYPE = torch.int64  # what torch.nn.BatchNorm2d registers


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


def _seed_keys(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict under the seed's key names, and the layout it came in."""
    layout = detect_layout(list(sd))
    if layout == TORCHVISION:
        return {torchvision_to_seed(k): v for k, v in sd.items()}, layout
    return dict(sd), layout


def _flax_path(key: str, ndim: int) -> tuple[str, ...] | None:
    """The Flax path of a seed key, or None when no leaf rule takes it."""
    module, _, leaf = key.rpartition(".")
    rule = _BY_TORCH.get((leaf, ndim))
    return None if rule is None or not module else (rule.collection, *module.split("."), rule.flax_name)


def _flax_name(key: str, shape: tuple[int, ...]) -> str:
    path = _flax_path(key, len(shape))
    return key if path is None else "/".join(path)


def _flax_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    module, _, leaf = key.rpartition(".")
    rule = _BY_TORCH.get((leaf, len(shape)))
    return shape if rule is None or rule.perm is None else tuple(shape[i] for i in rule.perm)


def _same_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape


def _check(
    got: Shapes,
    expected: Shapes,
    what: str,
    name: Callable[[str, tuple[int, ...]], str],
    shown: Callable[[str, tuple[int, ...]], tuple[int, ...]] = _same_shape,
) -> None:
    """Raise ConversionError naming every missing, unexpected and misshapen key.

    Keys and shapes are compared in torch terms; ``name`` and ``shown`` put them in the caller's terms.
    """
    missing = [name(k, s) for k, s in expected.items() if k not in got]
    unexpected = [name(k, s) for k, s in got.items() if k not in expected]
    misshapen = [
        f"{name(k, s)}: got {shown(k, tuple(got[k]))}, expected {shown(k, s)}"
        for k, s in expected.items()
        if k in got and tuple(got[k]) != s
    ]
    if missing or unexpected or misshapen:
        lines = [f"checkpoint does not fit {what}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", misshapen)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise ConversionError("\n".join(lines))


def _infer(shapes: Shapes) -> ArchSpec:
    try:
        return infer_arch(shapes)
    except ValueError as e:
        raise ConversionError(str(e)) from None


def _torch_namer(layout: str) -> Callable[[str, tuple[int, ...]], str]:
    """Names keys in errors the way the user wrote them."""
    return (lambda k, s: seed_to_torchvision(k)) if layout == TORCHVISION else (lambda k, s: k)


def _fresh_batch_stats(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Default BatchNorm buffers (mean 0, var 1, counter 0) for every 1-D ``weight`` in sd."""
    fresh = {}
    for key, t in sd.items():
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and t.dim() == 1:
            fresh[f"{module}.running_mean"] = torch.zeros_like(t)
            fresh[f"{module}.running_var"] = torch.ones_like(t)
            fresh[f"{module}.{_COUNTER}"] = torch.tensor(0, dtype=_TORCH_COUNTER_DTYPE)
    return fresh


def _check_x64(dtypes: Iterable[tuple[str, np.dtype]]) -> None:
    if jax.dtypes.canonicalize_dtype(np.float64) == np.float64:  # x64 on, globally or in a context
        return
    wide = [k for k, d in dtypes if d == np.float64]
    if wide:
        raise ConversionError(
            f"{len(wide)} float64 tensors (e.g. {wide[0]}) need jax.config.update('jax_enable_x64', True) "
            "to stay float64, or pass dtype=torch.float32 to cast them"
        )


def _torch_leaf_to_numpy(rule: LeafRule, t: torch.Tensor, cast: np.dtype | None) -> np.ndarray:
    """One torch leaf in Flax layout, in fresh aligned host memory."""
    if rule.torch_name == _COUNTER:
        return np.asarray(int(t), COUNTER_DTYPE)
    shape = tuple(t.shape) if rule.perm is None else tuple(t.shape[i] for i in rule.perm)
    out = aligned_empty(shape, cast if cast is not None and t.is_floating_point() else numpy_dtype(t.dtype))
    permuted_copy(t, rule.perm, numpy_to_torch(out))
    return out


def torch_to_flax(obj: Any, target: FlaxResNet | None = None, *, dtype: Any = None) -> Variables:
    """A PyTorch ResNet's weights -> ``{'params': ..., 'batch_stats': ...}`` for resnet_flax.

    ``obj`` is a state dict, an ``nn.Module``, or ``named_parameters()`` (plus ``named_buffers()``)
    pairs, with the seed's or torchvision's key names. The result is checked against ``target``
    (a resnet_flax.ResNet) or, without it, the architecture the keys describe; any missing,
    unexpected or misshapen key raises ConversionError naming all of them. dtypes are kept unless
    ``dtype`` (torch or numpy/jax) asks for a cast of the floating-point tensors.
    """
    sd, layout = _seed_keys(_as_state_dict(obj))
    if not any(k.endswith(_BN_BUFFERS) for k in sd):
        fresh = _fresh_batch_stats(sd)
        if fresh:
            warnings.warn(
                "no BatchNorm buffers given (named_parameters() alone?): running statistics take the "
                "fresh defaults mean 0, var 1, num_batches_tracked 0",
                stacklevel=2,
            )
            sd.update(fresh)
    shapes = {k: tuple(t.shape) for k, t in sd.items()}
    spec = ArchSpec.of_flax_model(target) if target is not None else _infer(shapes)
    expected = spec.torch_shapes()
    _check(shapes, expected, spec.describe(), _torch_namer(layout))

    cast = None if dtype is None else numpy_dtype(dtype)
    _check_x64((k, cast if cast is not None and t.is_floating_point() else numpy_dtype(t.dtype)) for k, t in sd.items())
    flat = {}
    with one_torch_thread():
        for key in expected:
            t = sd[key].detach().cpu()
            path = _flax_path(key, t.dim())
            assert path is not None  # every key of the spec's shapes has a leaf rule
            flat[path] = _torch_leaf_to_numpy(_BY_FLAX[(path[0], path[-1], t.dim())], t, cast)
    return traverse_util.unflatten_dict(to_jax(flat))


def _flax_leaves(variables: Any) -> tuple[dict[str, Any], dict[str, tuple[int, ...]], list[str]]:
    """{seed key: leaf}, {seed key: torch shape} and the Flax paths no rule takes."""
    if not isinstance(variables, Mapping) or "params" not in variables:
        got = f"keys {sorted(map(str, variables))}" if isinstance(variables, Mapping) else type(variables).__name__
        raise ConversionError(f"expected Flax variables {{'params': ..., 'batch_stats': ...}}, got {got}")
    leaves, shapes, unknown = {}, {}, []
    for path, x in traverse_util.flatten_dict(dict(variables)).items():
        shape = tuple(np.shape(x))
        rule = _BY_FLAX.get((path[0], path[-1], len(shape))) if len(path) > 2 else None
        if rule is None:
            unknown.append("/".join(map(str, path)))
            continue
        key = ".".join([*path[1:-1], rule.torch_name])
        leaves[key] = (rule, x)
        inv = rule.inverse_perm()
        shapes[key] = shape if inv is None else tuple(shape[i] for i in inv)
    return leaves, shapes, unknown


def _flax_leaf_to_torch(rule: LeafRule, src: torch.Tensor, cast: torch.dtype | None) -> torch.Tensor:
    """One Flax leaf (viewed as a tensor) in torch layout, in fresh memory the tensor owns."""
    if rule.torch_name == _COUNTER:
        return torch.tensor(int(src), dtype=_TORCH_COUNTER_DTYPE)
    inv = rule.inverse_perm()
    shape = tuple(src.shape) if inv is None else tuple(src.shape[i] for i in inv)
    out = torch.empty(shape, dtype=cast if cast is not None and src.is_floating_point() else src.dtype)
    permuted_copy(src, inv, out)
    return out


def flax_to_torch(
    variables: Mapping[str, Any], layout: str = SEED, *, dtype: Any = None
) -> collections.OrderedDict[str, torch.Tensor]:
    """resnet_flax variables -> an OrderedDict state dict that ``load_state_dict(strict=True)`` accepts.

    ``layout="seed"`` gives resnet_torch's keys, ``layout="torchvision"`` torchvision's. The tree is
    checked against the architecture it describes first; nothing half-converted is returned.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    leaves, shapes, unknown = _flax_leaves(variables)
    spec = _infer(shapes)
    expected = spec.torch_shapes()
    _check({**shapes, **{u: () for u in unknown}}, expected, spec.describe(), _flax_name, _flax_shape)

    cast = None if dtype is None else torch_dtype(numpy_dtype(dtype))
    rename = seed_to_torchvision if layout == TORCHVISION else str
    views = torch_views([leaves[k][1] for k in expected])
    out = collections.OrderedDict()
    with one_torch_thread():
        for key, src in zip(expected, views, strict=True):
            out[rename(key)] = _flax_leaf_to_torch(leaves[key][0], src, cast)
    return out


def check_state_dict(obj: Any) -> tuple[ArchSpec, collections.OrderedDict[str, torch.Tensor]]:
    """The architecture of a torch checkpoint and its tensors under the seed's keys, in model order.

    Raises ConversionError naming every missing, unexpected or misshapen key.
    """
    sd, layout = _seed_keys(_as_state_dict(obj))
    shapes = {k: tuple(t.shape) for k, t in sd.items()}
    spec = _infer(shapes)
    expected = spec.torch_shapes()
    _check(shapes, expected, spec.describe(), _torch_namer(layout))
    return spec, collections.OrderedDict((k, sd[k]) for k in expected)


def check_flax_variables(variables: Any) -> tuple[ArchSpec, Variables]:
    """The architecture of a Flax variables tree and the tree as jax arrays.

    Raises ConversionError naming every missing, unexpected or misshapen leaf.
    """
    leaves, shapes, unknown = _flax_leaves(variables)
    spec = _infer(shapes)
    _check({**shapes, **{u: () for u in unknown}}, spec.torch_shapes(), spec.describe(), _flax_name, _flax_shape)
    _check_x64((k, np.dtype(x.dtype)) for k, (_, x) in leaves.items())
    tree = {c: variables[c] for c in _COLLECTIONS if c in variables}
    return spec, jax.device_put(tree)


def arch_of(obj: Any) -> ArchSpec:
    """The architecture a state dict, nn.Module, pairs or Flax variables tree describes."""
    if isinstance(obj, Mapping) and "params" in obj:
        return _infer(_flax_leaves(obj)[1])
    sd, _ = _seed_keys(_as_state_dict(obj))
    return _infer({k: tuple(v.shape) for k, v in sd.items()})
