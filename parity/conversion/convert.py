"""PyTorch state dicts <-> Flax variable trees, by one rule over names for every depth.

The module path is shared (``conv2_x.0.shortcut.1`` is ``('conv2_x', '0', 'shortcut', '1')``);
each leaf kind has one name on either side and one transform (``LEAF_RULES``); the other torch
layouts are renamed to the seed's by ``parity.conversion.names``. Each direction checks its input once,
where it enters (``check_state_dict``, ``check_flax_variables``): names, layout, architecture,
every shape, dtypes and values, before a single leaf is converted, so nothing half-converted is
ever returned.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import traverse_util

from resnet_arch import BN_COUNTER, BN_STATS, DTYPES
from resnet_flax.layers import COUNTER_DTYPE
from resnet_flax.model import ResNet as FlaxResNet

from .arch import ArchSpec, NotThisArchitecture, check_hub_config, infer_arch, not_this_architecture
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
from .names import SEED, WRAPPER_PREFIXES, check_layout, from_seed, recognise, variant_features
from .rules import BY_TORCH, LeafRule, flax_path, flax_rule, seed_module

Variables = dict[str, Any]
Shapes = Mapping[str, tuple[int, ...]]

ERROR, WARN = "error", "warn"
# What NaN/inf weights and a negative or fractional BatchNorm counter get: an error or a warning.
BAD_VALUES = (ERROR, WARN)


class ConversionError(ValueError):
    """A checkpoint does not fit the model: every missing, unexpected or misshapen key is named."""


_COLLECTIONS = ("params", "batch_stats")
_TORCH_COUNTER_DTYPE = torch.int64  # what torch.nn.BatchNorm2d registers
# Weights come in the project's dtypes only (resnet_arch.DTYPES): no integer, complex or float8 tensors.
_WEIGHT_DTYPES = tuple(getattr(torch, name) for name in DTYPES.values())
_COUNTER_RANGE = (int(np.iinfo(COUNTER_DTYPE).min), int(np.iinfo(COUNTER_DTYPE).max))


def _flax_name(key: str, shape: tuple[int, ...]) -> str:
    path = flax_path(key, len(shape))
    return key if path is None else "/".join(path)


def _flax_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    rule = BY_TORCH.get((seed_module(key)[1], len(shape)))
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
    _raise_listed(
        f"checkpoint does not fit {what}:",
        {"missing": missing, "unexpected": unexpected, "shape mismatch": misshapen},
    )


def _raise_listed(title: str, sections: Mapping[str, list[str]], hint: str = "") -> None:
    """Raise ConversionError with one line per non-empty section, naming every item."""
    lines = [f"  {head} ({len(items)}): " + ", ".join(items) for head, items in sections.items() if items]
    if lines:
        raise ConversionError("\n".join([title, *lines, *([hint] if hint else [])]))


def _infer(shapes: Shapes) -> ArchSpec:
    try:
        return infer_arch(shapes)
    except ValueError as e:
        raise ConversionError(str(e)) from None


def _check_dtypes(dtypes: Mapping[str, str], name: Callable[[str], str]) -> None:
    """{seed key: dtype name} -> ConversionError naming every tensor of a dtype no weight has."""
    allowed = list(DTYPES.values())
    bad = [
        f"{name(k)}: {dtype}"
        for k, dtype in dtypes.items()
        if dtype not in allowed and not (k.endswith(BN_COUNTER) and dtype.startswith(("int", "uint")))
    ]
    _raise_listed(
        "checkpoint holds tensors of a dtype a weight cannot have (no complex, float8, integer or quantized "
        f"weights; expected {', '.join(allowed)}):",
        {"dtype": bad},
    )


def _check_values(
    tensors: Mapping[str, torch.Tensor], name: Callable[[str], str], bad_values: str, stacklevel: int
) -> dict[str, int]:
    """Refuse (or warn about) NaN/inf weights and odd BatchNorm counters; returns {seed key: counter}.

    A counter that is NaN or outside int32 (Flax keeps it as int32) is always an error; a negative or
    fractional one, like a NaN/inf weight, is an error or a warning as ``bad_values`` says.
    """
    nonfinite, odd, impossible, counters = [], [], [], {}
    with one_torch_thread():  # a reduction per tensor, memory-bound like the copies
        for key, t in tensors.items():
            if key.endswith(BN_COUNTER):
                value = float(t) if t.is_floating_point() else int(t)
                if not math.isfinite(value) or not _COUNTER_RANGE[0] <= value <= _COUNTER_RANGE[1]:
                    impossible.append(f"{name(key)} = {value}")
                    continue
                if value < 0 or value != int(value):
                    odd.append(f"{name(key)} = {value}")
                counters[key] = int(value)
            elif not bool(torch.isfinite(t.sum())):  # one pass; a sum that overflows is checked element-wise
                nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                if nan or inf:
                    nonfinite.append(f"{name(key)} ({nan} NaN, {inf} inf)")
    _raise_listed(
        "BatchNorm counters (num_batches_tracked) that cannot be stored (NaN, or outside int32):",
        {"counter": impossible},
    )
    found = {"NaN/inf": nonfinite, "negative or fractional counter": odd}
    if bad_values == ERROR:
        _raise_listed("checkpoint holds values no trained network has:", found, "  (bad_values='warn' converts them)")
    elif nonfinite or odd:
        lines = "; ".join(f"{head}: {', '.join(items)}" for head, items in found.items() if items)
        warnings.warn(f"converting values no trained network has: {lines}", stacklevel=stacklevel + 1)
    return counters


def _check_bad_values(bad_values: str) -> None:
    if bad_values not in BAD_VALUES:
        raise ValueError(f"bad_values must be one of {', '.join(BAD_VALUES)}, got {bad_values!r}")


def _cast_dtype(dtype: Any) -> np.dtype | None:
    """The numpy dtype a ``dtype=`` option casts to; ValueError unless it is a weight dtype."""
    if dtype is None:
        return None
    try:
        cast = numpy_dtype(dtype)
    except (TypeError, ValueError):
        cast = None
    if cast is None or cast.name not in DTYPES.values():
        raise ValueError(f"dtype casts floating-point weights: one of {', '.join(DTYPES.values())}, got {dtype}")
    return cast


def _check_x64(dtypes: Iterable[tuple[str, np.dtype]]) -> None:
    if jax.dtypes.canonicalize_dtype(np.float64) == np.float64:  # x64 on, globally or in a context
        return
    wide = [k for k, d in dtypes if d == np.float64]
    if wide:
        raise ConversionError(
            f"{len(wide)} float64 tensors (e.g. {wide[0]}) need jax.config.update('jax_enable_x64', True) "
            "to stay float64, or pass dtype=torch.float32 to cast them"
        )


# --- torch side ---------------------------------------------------------------------------------


def _as_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], bool, Mapping[str, Any] | None]:
    """A state dict, an nn.Module, or (name, tensor) pairs -> ({name: tensor}, given as pairs?, hub config).

    The config is a transformers model's ``config`` or a timm model's ``pretrained_cfg``, if any.
    """
    if isinstance(obj, torch.nn.Module):
        to_dict = getattr(getattr(obj, "config", None), "to_dict", None)
        config = to_dict() if callable(to_dict) else getattr(obj, "pretrained_cfg", None)
        return dict(obj.state_dict()), False, config if isinstance(config, Mapping) else None
    if isinstance(obj, Mapping):
        items, pairs = list(obj.items()), False
    else:
        try:
            items, pairs = list(obj), True
        except TypeError:
            raise TypeError(
                f"expected a state dict, an nn.Module or (name, tensor) pairs, got {type(obj).__name__}"
            ) from None
    out = {}
    for pair in items:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
            raise TypeError(f"expected (name, tensor) pairs, got {pair!r:.80}")
        name, value = pair
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{name}: expected a torch.Tensor, got {type(value).__name__} (a training checkpoint? pass the "
                "state dict inside it, e.g. ckpt['state_dict'])"
            )
        out[name] = value
    return out, pairs, None


def _unwrap(sd: dict[str, torch.Tensor], stacklevel: int) -> dict[str, torch.Tensor]:
    """Strip the prefixes that DataParallel/DDP and torch.compile put before every key, with a warning."""
    stripped = True
    while stripped and sd:
        stripped = False
        for prefix, who in WRAPPER_PREFIXES.items():
            if all(k.startswith(prefix) for k in sd):
                warnings.warn(f"stripped {prefix!r} ({who}) from every key", stacklevel=stacklevel + 1)
                sd, stripped = {k.removeprefix(prefix): v for k, v in sd.items()}, True
    return sd


def _fresh_batch_stats(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Default BatchNorm buffers (mean 0, var 1, counter 0) for every 1-D ``weight`` in sd."""
    fresh = {}
    for key, t in sd.items():
        module, leaf = seed_module(key)
        if leaf == "weight" and t.dim() == 1:
            fresh[f"{module}.running_mean"] = torch.zeros_like(t)
            fresh[f"{module}.running_var"] = torch.ones_like(t)
            fresh[f"{module}.{BN_COUNTER}"] = torch.tensor(0, dtype=_TORCH_COUNTER_DTYPE)
    return fresh


def _torch_leaf_to_numpy(rule: LeafRule, t: torch.Tensor, cast: np.dtype | None) -> np.ndarray:
    """One torch leaf in Flax layout, in fresh aligned host memory."""
    if rule.torch_name == BN_COUNTER:
        return np.asarray(int(t), COUNTER_DTYPE)
    shape = tuple(t.shape) if rule.perm is None else tuple(t.shape[i] for i in rule.perm)
    out = aligned_empty(shape, cast if cast is not None else numpy_dtype(t.dtype))
    permuted_copy(t, rule.perm, numpy_to_torch(out))
    return out


def _leaf_rule(key: str, ndim: int) -> LeafRule:
    return BY_TORCH[(seed_module(key)[1], ndim)]


@dataclasses.dataclass(frozen=True)
class TorchWeights:
    """A checked torch checkpoint: its architecture, and its tensors under the seed's keys in model order."""

    spec: ArchSpec
    tensors: collections.OrderedDict[str, torch.Tensor]  # counters as int64 scalars
    layout: str  # the layout the keys came in

    def to_flax(self, dtype: Any = None) -> Variables:
        """The Flax variables tree; floating-point leaves cast to ``dtype`` if given."""
        cast = _cast_dtype(dtype)
        _check_x64((k, cast or numpy_dtype(t.dtype)) for k, t in self.tensors.items() if t.is_floating_point())
        flat = {}
        with one_torch_thread():
            for key, t in self.tensors.items():
                t = t.detach().cpu()
                path = flax_path(key, t.dim())
                flat[path] = _torch_leaf_to_numpy(_leaf_rule(key, t.dim()), t, cast)
        return traverse_util.unflatten_dict(to_jax(flat))

    def to_torch(self, layout: str = SEED, dtype: Any = None) -> collections.OrderedDict[str, torch.Tensor]:
        """The state dict in ``layout``'s names, floating-point tensors cast to ``dtype`` if given (else shared)."""
        check_layout(layout)
        _check_representable(self.spec, layout)
        cast = _cast_dtype(dtype)
        target = None if cast is None else torch_dtype(cast)
        return collections.OrderedDict(
            (from_seed(k, layout), t.to(target) if target is not None and t.is_floating_point() else t)
            for k, t in self.tensors.items()
        )


def _check_representable(spec: ArchSpec, layout: str) -> None:
    try:
        spec.check_layout(layout)
    except ValueError as e:
        raise ConversionError(str(e)) from None


def check_state_dict(
    obj: Any,
    target: FlaxResNet | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    bad_values: str = ERROR,
    stacklevel: int = 1,
) -> TorchWeights:
    """Check a torch checkpoint once, where it enters: names, layout, architecture, shapes, dtypes, values.

    ``obj`` is a state dict, an ``nn.Module`` or (name, tensor) pairs, in any layout of
    ``parity.conversion.names``; ``module.`` and ``_orig_mod.`` prefixes are stripped with a warning. The
    architecture is ``target``'s (a resnet_flax.ResNet) or, without it, the one the keys describe;
    ``config`` (a hub's config.json, or the model's own) is checked against it. Raises
    ConversionError naming every offending key (ConversionError saying which feature, for a ResNet
    variant this model cannot represent).
    """
    _check_bad_values(bad_values)
    sd, pairs, module_config = _as_state_dict(obj)
    sd = _unwrap(sd, stacklevel + 1)
    try:
        if features := variant_features(sd):
            raise not_this_architecture(features)
        layout, renamed = recognise(sd)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    seed = {renamed.get(k, k): t for k, t in sd.items()}
    names = {seed_key: key for key, seed_key in renamed.items()}

    def name(key: str) -> str:  # in the caller's names
        return names.get(key) or from_seed(key, layout)

    if not any(seed_module(k)[1] in BN_STATS for k in seed) and (fresh := _fresh_batch_stats(seed)):
        if not pairs:
            raise ConversionError(
                "no BatchNorm running statistics at all: a model with another normalization (GroupNorm: timm "
                "resnet50_gn), or parameters without their buffers (pass named_parameters() pairs to take fresh "
                "statistics)"
            )
        warnings.warn(
            "no BatchNorm buffers given (named_parameters() alone?): running statistics take the "
            "fresh defaults mean 0, var 1, num_batches_tracked 0",
            stacklevel=stacklevel + 1,
        )
        seed.update(fresh)
    shapes = {k: tuple(t.shape) for k, t in seed.items()}
    spec = ArchSpec.of_flax_model(target) if target is not None else _infer(shapes)
    for cfg in (config, module_config):
        if cfg:
            try:
                check_hub_config(cfg, spec)
            except NotThisArchitecture as e:
                raise ConversionError(str(e)) from None
    expected = spec.torch_shapes()
    _check(shapes, expected, spec.describe(), lambda k, s: name(k))
    unreadable = [name(k) for k, t in seed.items() if t.is_meta or t.layout != torch.strided or t.is_quantized]
    _raise_listed("checkpoint holds tensors without plain data (meta, sparse or quantized):", {"tensor": unreadable})
    _check_dtypes({k: str(t.dtype).removeprefix("torch.") for k, t in seed.items()}, name)
    counters = _check_values({k: seed[k].detach() for k in expected}, name, bad_values, stacklevel + 1)
    tensors = collections.OrderedDict(
        (k, torch.tensor(counters[k], dtype=_TORCH_COUNTER_DTYPE) if k in counters else seed[k]) for k in expected
    )
    return TorchWeights(spec, tensors, layout)


def torch_to_flax(
    obj: Any, target: FlaxResNet | None = None, *, dtype: Any = None, bad_values: str = ERROR
) -> Variables:
    """A PyTorch ResNet's weights -> ``{'params': ..., 'batch_stats': ...}`` for resnet_flax.

    ``obj`` is a state dict, an ``nn.Module``, or ``named_parameters()`` (plus ``named_buffers()``)
    pairs, with the seed's, torchvision's/timm's or transformers' key names (recognised from the
    keys). The result is checked against ``target`` (a resnet_flax.ResNet) or, without it, the
    architecture the keys describe; any missing, unexpected or misshapen key raises ConversionError
    naming all of them. dtypes are kept unless ``dtype`` (torch or numpy/jax, floating-point) asks
    for a cast of the floating-point tensors. NaN/inf weights and a negative or fractional
    BatchNorm counter raise ConversionError, or warn with ``bad_values="warn"``.
    """
    return check_state_dict(obj, target, bad_values=bad_values, stacklevel=2).to_flax(dtype)


# --- Flax side ----------------------------------------------------------------------------------


def _flax_leaves(variables: Any) -> tuple[dict[str, tuple[LeafRule, Any]], dict[str, tuple[int, ...]], list[str]]:
    """{seed key: (rule, leaf)}, {seed key: torch shape} and the Flax paths no rule takes."""
    if not isinstance(variables, Mapping) or "params" not in variables:
        got = f"keys {sorted(map(str, variables))}" if isinstance(variables, Mapping) else type(variables).__name__
        raise ConversionError(f"expected Flax variables {{'params': ..., 'batch_stats': ...}}, got {got}")
    leaves, shapes, unknown = {}, {}, []
    for path, x in traverse_util.flatten_dict(dict(variables)).items():
        shape = tuple(np.shape(x))
        named = flax_rule(tuple(map(str, path)), len(shape))
        if named is None:
            unknown.append("/".join(map(str, path)))
            continue
        key, rule = named
        leaves[key] = (rule, x)
        inv = rule.inverse_perm()
        shapes[key] = shape if inv is None else tuple(shape[i] for i in inv)
    return leaves, shapes, unknown


def _flax_leaf_to_torch(rule: LeafRule, src: torch.Tensor, cast: torch.dtype | None) -> torch.Tensor:
    """One Flax leaf (viewed as a tensor) in torch layout, in fresh memory the tensor owns."""
    inv = rule.inverse_perm()
    shape = tuple(src.shape) if inv is None else tuple(src.shape[i] for i in inv)
    out = torch.empty(shape, dtype=cast if cast is not None else src.dtype)
    permuted_copy(src, inv, out)
    return out


@dataclasses.dataclass(frozen=True)
class FlaxWeights:
    """A checked Flax variables tree: its architecture, and its leaves by seed key in model order."""

    spec: ArchSpec
    leaves: collections.OrderedDict[str, tuple[LeafRule, Any]]  # seed key -> (rule, jax or numpy array)
    views: collections.OrderedDict[str, torch.Tensor]  # seed key -> the leaf's host memory as a tensor
    counters: dict[str, int]

    def to_torch(self, layout: str = SEED, dtype: Any = None) -> collections.OrderedDict[str, torch.Tensor]:
        """The state dict in ``layout``'s names, in fresh memory; floating-point tensors cast to ``dtype`` if given."""
        check_layout(layout)
        _check_representable(self.spec, layout)
        cast = _cast_dtype(dtype)
        target = None if cast is None else torch_dtype(cast)
        out = collections.OrderedDict()
        with one_torch_thread():
            for key, src in self.views.items():
                if key in self.counters:
                    out[from_seed(key, layout)] = torch.tensor(self.counters[key], dtype=_TORCH_COUNTER_DTYPE)
                else:
                    out[from_seed(key, layout)] = _flax_leaf_to_torch(self.leaves[key][0], src, target)
        return out

    def to_flax(self, dtype: Any = None) -> Variables:
        """The variables tree as jax arrays; floating-point leaves cast to ``dtype`` if given."""
        cast = _cast_dtype(dtype)
        _check_x64((k, cast or np.dtype(x.dtype)) for k, (_, x) in self.leaves.items() if k not in self.counters)
        flat = {}
        for key, (rule, x) in self.leaves.items():
            path = (rule.collection, *seed_module(key)[0].split("."), rule.flax_name)
            if key in self.counters:
                flat[path] = jnp.asarray(self.counters[key], COUNTER_DTYPE)
            else:
                flat[path] = jnp.asarray(x, cast or x.dtype)
        return traverse_util.unflatten_dict(flat)


def check_flax_variables(variables: Any, *, bad_values: str = ERROR, stacklevel: int = 1) -> FlaxWeights:
    """Check a Flax variables tree once, where it enters: paths, architecture, shapes, dtypes, values.

    Raises ConversionError naming every missing, unexpected or misshapen leaf, or every leaf of an
    unusable dtype or value.
    """
    _check_bad_values(bad_values)
    leaves, shapes, unknown = _flax_leaves(variables)
    spec = _infer(shapes)
    expected = spec.torch_shapes()
    _check({**shapes, **{u: () for u in unknown}}, expected, spec.describe(), _flax_name, _flax_shape)

    def name(key: str) -> str:
        return _flax_name(key, shapes[key])

    _check_dtypes({k: jnp.dtype(x.dtype).name for k, (_, x) in leaves.items()}, name)
    views = collections.OrderedDict(zip(expected, torch_views([leaves[k][1] for k in expected]), strict=True))
    counters = _check_values(views, name, bad_values, stacklevel + 1)
    return FlaxWeights(spec, collections.OrderedDict((k, leaves[k]) for k in expected), views, counters)


def flax_to_torch(
    variables: Mapping[str, Any], layout: str = SEED, *, dtype: Any = None, bad_values: str = ERROR
) -> collections.OrderedDict[str, torch.Tensor]:
    """resnet_flax variables -> an OrderedDict state dict that ``load_state_dict(strict=True)`` accepts.

    ``layout`` names the keys: ``"seed"`` (resnet_torch), ``"torchvision"``, ``"timm"`` (torchvision's
    names) or ``"transformers"`` (``ResNetForImageClassification``). The tree is checked once first;
    nothing half-converted is returned.
    """
    check_layout(layout)
    return check_flax_variables(variables, bad_values=bad_values, stacklevel=2).to_torch(layout, dtype)


def arch_of(obj: Any) -> ArchSpec:
    """The architecture a state dict, nn.Module, pairs or Flax variables tree describes."""
    if isinstance(obj, Mapping) and "params" in obj:
        return _infer(_flax_leaves(obj)[1])
    sd = _unwrap(_as_state_dict(obj)[0], 2)
    try:
        renamed = recognise(sd)[1]
    except ValueError as e:
        raise ConversionError(str(e)) from None
    return _infer({renamed.get(k, k): tuple(v.shape) for k, v in sd.items()})
