"""PyTorch state dicts <-> Flax variable trees, by one rule over names for every depth.

The module path is shared (``conv2_x.0.shortcut.1`` is ``('conv2_x', '0', 'shortcut', '1')``);
each leaf kind has one name on either side and one transform (``parity.conversion.rules``); the other
torch layouts are renamed to the seed's by ``parity.conversion.names``. Each direction checks its
input once, where it enters (``check_state_dict``, ``check_flax_variables``), in named steps: names,
layout, architecture, every shape, dtypes and values (``parity.conversion.validate``), before a single
leaf is converted, so nothing half-converted is ever returned. The checked ``Weights``
(``parity.conversion.weights``) then give either framework's weights. Everywhere, as in Flax,
``param_dtype`` is the weights' dtype (a cast) and ``dtype`` a model's computation dtype.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from resnet_arch import BN_COUNTER, BN_STATS, LINEN
from resnet_flax.model import ResNet as FlaxResNet

from .arch import ArchSpec, NotThisArchitecture, check_hub_config, class_count_mismatches, not_this_architecture
from .arrays import torch_views
from .files import TORCH
from .names import (
    SEED,
    TRANSFORMERS,
    WRAPPER_PREFIXES,
    check_layout,
    count_stem_convs,
    from_seed,
    recognise,
    variant_features,
)
from .rules import PARAMS, flax_leaves, flax_path, seed_module, torch_rule
from .validate import (
    ERROR,
    ConversionError,
    check_bad_values,
    check_dtypes,
    check_names_and_shapes,
    check_plain_data,
    check_values,
    infer,
)
from .weights import TORCH_COUNTER_DTYPE, Variables, Weights

Name = Callable[[str], str]  # a seed key in the caller's terms


# --- torch side: the steps of check_state_dict ---------------------------------------------------


def _read_torch_object(obj: Any) -> tuple[dict[str, torch.Tensor], bool, Mapping[str, Any] | None]:
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


def _recognise_layout(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, Name]:
    """The tensors under seed keys, the layout the caller's keys are in, and a seed key's name in it.

    ConversionError for a ResNet variant the key names show, mixed layouts or two keys naming one weight.
    """
    try:
        if features := variant_features(sd):
            raise not_this_architecture(features)
        layout, renamed = recognise(sd)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    names = {seed_key: key for key, seed_key in renamed.items()}
    stem_convs = count_stem_convs(names)

    def name(key: str) -> str:
        return names.get(key) or from_seed(key, layout, stem_convs)

    return {renamed.get(k, k): t for k, t in sd.items()}, layout, name


def _fresh_batch_stats(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Default BatchNorm buffers (mean 0, var 1, counter 0) for every 1-D ``weight`` in sd."""
    fresh = {}
    for key, t in sd.items():
        module, leaf = seed_module(key)
        if leaf == "weight" and t.dim() == 1:
            fresh[f"{module}.running_mean"] = torch.zeros_like(t)
            fresh[f"{module}.running_var"] = torch.ones_like(t)
            fresh[f"{module}.{BN_COUNTER}"] = torch.tensor(0, dtype=TORCH_COUNTER_DTYPE)
    return fresh


def _add_fresh_stats(seed: dict[str, torch.Tensor], pairs: bool, stacklevel: int) -> dict[str, torch.Tensor]:
    """Parameters without any BatchNorm buffer: given as pairs, they take fresh statistics with a warning."""
    if any(seed_module(k)[1] in BN_STATS for k in seed) or not (fresh := _fresh_batch_stats(seed)):
        return seed
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
    return {**seed, **fresh}


def _check_variant_layout(spec: ArchSpec, layout: str) -> None:
    """ConversionError naming the variant when keys in a layout that has no such variant describe one
    (transformers' names with grouped or widened shapes). torchvision's names are timm's too, so keys in them
    may hold any variant."""
    if spec.variant_options() and layout == TRANSFORMERS:
        try:
            spec.check_layout(layout)
        except ValueError as e:
            raise ConversionError(str(e)) from None


def _check_hub_configs(spec: ArchSpec, *configs: Mapping[str, Any] | None) -> None:
    """ConversionError when a hub config (a directory's config.json, the model's own) describes another network."""
    for config in configs:
        if config:
            try:
                check_hub_config(config, spec)
            except NotThisArchitecture as e:
                raise ConversionError(str(e)) from None


def _check_class_count(spec: ArchSpec, config: Mapping[str, Any] | None) -> None:
    """ConversionError naming both counts when a directory's config.json gives the head another class count.

    Only a directory's config: a timm model's own ``pretrained_cfg`` keeps the class count of the weights
    it was first trained with, whatever its head now has.
    """
    mismatches = class_count_mismatches(config or {}, spec)
    if mismatches:
        raise ConversionError(
            f"{'; '.join(mismatches)} where the weights' classifier has {spec.num_classes} classes: the config "
            "describes another model's head"
        )


def check_state_dict(
    obj: Any,
    target: FlaxResNet | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    bad_values: str = ERROR,
    stacklevel: int = 1,
) -> Weights:
    """Check a torch checkpoint once, where it enters: names, layout, architecture, shapes, dtypes, values.

    ``obj`` is a state dict, an ``nn.Module`` or (name, tensor) pairs, in any layout of
    ``parity.conversion.names``; ``module.`` and ``_orig_mod.`` prefixes are stripped with a warning. The
    architecture is ``target``'s (a resnet_flax.ResNet) or, without it, the one the keys describe;
    ``config`` (a hub directory's config.json) and the model's own config are checked against it, and
    the directory's class count. Raises ConversionError naming every offending key (ConversionError
    saying which feature, for a ResNet variant this model cannot represent).
    """
    check_bad_values(bad_values)
    sd, pairs, own_config = _read_torch_object(obj)
    sd = _unwrap(sd, stacklevel + 1)
    seed, layout, name = _recognise_layout(sd)
    seed = _add_fresh_stats(seed, pairs, stacklevel + 1)
    shapes = {k: tuple(t.shape) for k, t in seed.items()}
    spec = ArchSpec.of_flax_model(target) if target is not None else infer(shapes)
    _check_variant_layout(spec, layout)
    _check_hub_configs(spec, config, own_config)
    _check_class_count(spec, config)
    expected = spec.torch_shapes()
    check_names_and_shapes(shapes, expected, spec.describe(), lambda k, s: name(k))
    check_plain_data(seed, name)
    check_dtypes({k: str(t.dtype).removeprefix("torch.") for k, t in seed.items()}, name)
    views = collections.OrderedDict((k, seed[k].detach()) for k in expected)
    counters = check_values(views, name, bad_values, stacklevel + 1)
    return Weights(spec, TORCH, collections.OrderedDict((k, seed[k]) for k in expected), views, counters)


def torch_to_flax(
    obj: Any, target: FlaxResNet | None = None, *, param_dtype: Any = None, bad_values: str = ERROR
) -> Variables:
    """A PyTorch ResNet's weights -> ``{'params': ..., 'batch_stats': ...}`` for resnet_flax.

    ``obj`` is a state dict, an ``nn.Module``, or ``named_parameters()`` (plus ``named_buffers()``)
    pairs, with the seed's, torchvision's/timm's or transformers' key names (recognised from the
    keys). The result is checked against ``target`` (a resnet_flax.ResNet) or, without it, the
    architecture the keys describe; any missing, unexpected or misshapen key raises ConversionError
    naming all of them. The weights keep their dtypes unless ``param_dtype`` (torch or numpy/jax,
    floating-point) casts the floating-point tensors. NaN/inf weights and a negative or fractional
    BatchNorm counter raise ConversionError, or warn with ``bad_values="warn"``.
    """
    return check_state_dict(obj, target, bad_values=bad_values, stacklevel=2).to_flax(param_dtype)


# --- Flax side: the steps of check_flax_variables -------------------------------------------------


def _flax_tree(variables: Any) -> Mapping[str, Any]:
    """The variables tree, or ConversionError saying what a Flax variables tree holds."""
    if not isinstance(variables, Mapping) or PARAMS not in variables:
        got = f"keys {sorted(map(str, variables))}" if isinstance(variables, Mapping) else type(variables).__name__
        raise ConversionError(f"expected Flax variables {{'params': ..., 'batch_stats': ...}}, got {got}")
    return variables


def _flax_name(key: str, shape: tuple[int, ...]) -> str:
    """A seed key's Flax path, ``/``-joined (a key no rule takes as it is)."""
    path = flax_path(key, len(shape))
    return key if path is None else "/".join(path)


def _flax_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A seed key's torch shape in Flax axes."""
    rule = torch_rule(key, len(shape))
    return shape if rule is None else rule.flax_shape(shape)


def check_flax_variables(variables: Any, *, bad_values: str = ERROR, stacklevel: int = 1) -> Weights:
    """Check a Flax variables tree once, where it enters: paths, architecture, shapes, dtypes, values.

    Raises ConversionError naming every missing, unexpected or misshapen leaf, or every leaf of an
    unusable dtype or value.
    """
    check_bad_values(bad_values)
    leaves, unknown = flax_leaves(_flax_tree(variables))
    abstract = [_flax_name(k, x.shape) for k, (_, x) in leaves.items() if isinstance(x, jax.ShapeDtypeStruct)]
    if abstract:
        raise ConversionError(
            f"Flax variables of abstract arrays (jax.ShapeDtypeStruct, from jax.eval_shape or nnx.eval_shape): "
            f"{len(abstract)} leaves (e.g. {abstract[0]}) hold shapes and dtypes, no values to convert"
        )
    shapes = {k: rule.torch_shape(tuple(np.shape(x))) for k, (rule, x) in leaves.items()}
    spec = infer(shapes)
    expected = spec.torch_shapes()
    check_names_and_shapes({**shapes, **{u: () for u in unknown}}, expected, spec.describe(), _flax_name, _flax_shape)

    def name(key: str) -> str:
        return _flax_name(key, shapes[key])

    check_dtypes({k: jnp.dtype(x.dtype).name for k, (_, x) in leaves.items()}, name)
    given = collections.OrderedDict((k, leaves[k][1]) for k in expected)
    views = collections.OrderedDict(zip(expected, torch_views(list(given.values())), strict=True))
    counters = check_values(views, name, bad_values, stacklevel + 1)
    return Weights(spec, LINEN, given, views, counters)


def flax_to_torch(
    variables: Mapping[str, Any], layout: str = SEED, *, param_dtype: Any = None, bad_values: str = ERROR
) -> collections.OrderedDict[str, torch.Tensor]:
    """resnet_flax variables -> an OrderedDict state dict that ``load_state_dict(strict=True)`` accepts.

    ``layout`` names the keys: ``"seed"`` (resnet_torch), ``"torchvision"``, ``"timm"`` (torchvision's
    names) or ``"transformers"`` (``ResNetForImageClassification``). The tree is checked once first;
    nothing half-converted is returned. ``param_dtype`` and ``bad_values`` as in ``torch_to_flax``.
    """
    check_layout(layout)
    return check_flax_variables(variables, bad_values=bad_values, stacklevel=2).to_torch(layout, param_dtype)


def arch_of(obj: Any) -> ArchSpec:
    """The architecture a state dict, nn.Module, pairs or Flax variables tree describes."""
    if isinstance(obj, Mapping) and PARAMS in obj:
        leaves = flax_leaves(obj)[0]
        return infer({k: rule.torch_shape(tuple(np.shape(x))) for k, (rule, x) in leaves.items()})
    seed = _recognise_layout(_unwrap(_read_torch_object(obj)[0], 2))[0]
    return infer({k: tuple(t.shape) for k, t in seed.items()})
