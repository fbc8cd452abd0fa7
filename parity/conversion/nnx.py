"""Weights between resnet_torch, the linen variables and ``resnet_flax.nnx`` models, by the one name rule.

An NNX model's state has the paths of the linen variables, its ``nnx.Param`` leaves are the
``params`` collection and its ``nnx.BatchStat`` leaves ``batch_stats``; so every conversion goes
through the linen variables tree and ``parity.conversion.convert``: the same rule over names, the same
whole-tree check naming every missing, unexpected or misshapen key before anything is converted, the
same ``bad_values`` and ``param_dtype`` as the linen converters. Models are built abstractly
(``nnx.eval_shape``: shapes only, no initial weights drawn) and then filled, so a conversion draws
no random numbers and allocates each weight once. As in Flax, ``param_dtype`` is the weights' dtype
and ``dtype`` a new model's computation dtype.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx, traverse_util

from resnet_arch import HEAD
from resnet_flax import nnx as flax_nnx

from .arch import ArchSpec
from .convert import check_flax_variables, check_state_dict
from .names import SEED
from .rules import BATCH_STATS, PARAMS
from .validate import ERROR, ConversionError, builder_options, check_names_and_shapes
from .weights import Variables, Weights, param_cast

# The Variable types of an NNX ResNet and the linen collections they are.
VARIABLE_COLLECTIONS: dict[type[nnx.Variable], str] = {nnx.Param: PARAMS, nnx.BatchStat: BATCH_STATS}


def nnx_spec(model: flax_nnx.ResNet) -> ArchSpec:
    """The architecture of an NNX ResNet (concrete or from ``nnx.eval_shape``), read from its options."""
    if not isinstance(model, flax_nnx.ResNet):
        raise TypeError(f"expected a resnet_flax.nnx.ResNet, got {type(model).__name__}")
    return ArchSpec.of_model(model)


def nnx_model(spec: ArchSpec, **options: Any) -> flax_nnx.ResNet:
    """An abstract NNX ResNet of this architecture (``nnx.eval_shape``: its variables are shapes, no
    weights are drawn), with the builder's other options (``dtype``, ``param_dtype``, ``precision``)."""
    block = flax_nnx.BLOCKS[spec.block]
    return nnx.eval_shape(
        lambda: flax_nnx.ResNet(block, spec.num_block, **spec.model_kwargs(), **options, rngs=nnx.Rngs(0))
    )


def _collection(variable: nnx.Variable) -> str:
    """The linen collection of a Variable; other types keep their class name (and are reported)."""
    return next(
        (name for kind, name in VARIABLE_COLLECTIONS.items() if isinstance(variable, kind)), type(variable).__name__
    )


def _flat_state(model: nnx.Module) -> dict[tuple[str, ...], nnx.Variable]:
    """{(collection, *path): Variable} for every Variable of the model."""
    return {(_collection(v), *map(str, path)): v for path, v in nnx.to_flat_state(nnx.state(model))}


def nnx_variables(model: nnx.Module) -> Variables:
    """An NNX model's state as the linen variables tree it is, by the Variable types alone: nothing checked
    but that it holds values (ConversionError for an abstract model, from ``nnx.eval_shape``)."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"expected an NNX module, got {type(model).__name__}")
    values = {path: v.get_value() for path, v in _flat_state(model).items()}
    abstract = ["/".join(path) for path, x in values.items() if isinstance(x, jax.ShapeDtypeStruct)]
    if abstract:
        raise ConversionError(
            f"the {type(model).__name__} is abstract (built with nnx.eval_shape): its {len(abstract)} Variables "
            f"(e.g. {abstract[0]}) hold shapes and dtypes, no values to convert; fill it first (e.g. torch_to_nnx("
            "state_dict, target=model))"
        )
    return traverse_util.unflatten_dict(values)


def check_nnx(model: flax_nnx.ResNet, *, bad_values: str = ERROR, stacklevel: int = 1) -> Weights:
    """Check an NNX ResNet's state once, as ``check_flax_variables`` checks linen variables.

    A Variable no rule takes (a folded model's biases, another type) or a missing one raises
    ConversionError naming every path; values as ``bad_values`` says.
    """
    return check_flax_variables(nnx_variables(model), bad_values=bad_values, stacklevel=stacklevel + 1)


def nnx_to_linen(model: flax_nnx.ResNet, *, bad_values: str = ERROR) -> Variables:
    """An NNX ResNet's state as linen variables ``{'params': ..., 'batch_stats': ...}`` (the same arrays),
    checked as ``flax_to_torch`` checks a linen tree."""
    return check_nnx(model, bad_values=bad_values, stacklevel=2).to_flax()


def _fill(model: flax_nnx.ResNet, variables: Mapping[str, Any]) -> None:
    """Put linen ``variables`` into the model's Variables (an NNX state has no collection level)."""
    flat = traverse_util.flatten_dict(dict(variables))
    nnx.update(model, traverse_util.unflatten_dict({path[1:]: x for path, x in flat.items()}))


def _check_target_param_dtype(target: flax_nnx.ResNet, param_dtype: Any) -> None:
    """ValueError when ``param_dtype`` is not the dtype of a target's parameters: a target keeps its dtypes."""
    cast = param_cast(param_dtype)
    params = {np.dtype(v.get_value().dtype) for p, v in _flat_state(target).items() if p[0] == PARAMS}
    if cast is not None and params != {cast}:
        raise ValueError(
            f"param_dtype={cast.name}, but the target's parameters are {', '.join(sorted(d.name for d in params))}: "
            "a target is filled in its own dtypes (leave param_dtype out)"
        )


def _is_float(dtype: np.dtype) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.floating))


def _fill_target(target: flax_nnx.ResNet, variables: Mapping[str, Any]) -> flax_nnx.ResNet:
    """Put ``variables`` into a given model's Variables, after checking every path and shape against it;
    floating-point leaves are cast to the dtype of the Variable they fill."""
    state = _flat_state(target)
    expected = {"/".join(p): tuple(v.get_value().shape) for p, v in state.items()}
    flat = traverse_util.flatten_dict(dict(variables))
    got = {"/".join(p): tuple(x.shape) for p, x in flat.items()}
    check_names_and_shapes(got, expected, f"the target {type(target).__name__}", lambda key, shape: key)
    dtypes = {p: np.dtype(v.get_value().dtype) for p, v in state.items()}
    cast = {p: x.astype(dtypes[p]) if _is_float(x.dtype) and x.dtype != dtypes[p] else x for p, x in flat.items()}
    _fill(target, traverse_util.unflatten_dict(cast))
    return target


def weights_to_nnx(
    weights: Weights, target: flax_nnx.ResNet | None = None, *, param_dtype: Any = None, **options: Any
) -> flax_nnx.ResNet:
    """Checked weights (``check_state_dict``, ``check_flax_variables``) -> a ``resnet_flax.nnx.ResNet``.

    Without ``target`` the model is built abstractly for the weights' architecture, with ``options``
    for the builder (``dtype``: its computation dtype, ``precision``; its ``param_dtype`` is the
    weights'), and comes back in eval mode; ``param_dtype`` casts the floating-point weights (default:
    each keeps its dtype). A ``target`` (e.g. from ``nnx.eval_shape``) keeps its own options, its
    mode and its dtypes: it is checked path by path and filled in place, each floating-point weight
    cast to the dtype of the Variable it fills (float32 weights in a target of bfloat16 parameters
    become bfloat16 there); ``param_dtype``, if given, must be the target's parameters' dtype.
    """
    if target is not None:
        if options:
            raise ValueError(f"builder options ({', '.join(options)}) are for a new model; a target keeps its own")
        _check_target_param_dtype(target, param_dtype)
        return _fill_target(target, weights.to_flax())
    variables = weights.to_flax(param_dtype)
    # Built from the weights' own architecture: its paths and shapes are the variables', as checked.
    options = builder_options(weights.spec, options)
    model = nnx_model(weights.spec, **{**options, "param_dtype": variables[PARAMS][HEAD]["kernel"].dtype})
    _fill(model, variables)
    model.eval()
    return model


def linen_to_nnx(
    variables: Mapping[str, Any],
    target: flax_nnx.ResNet | None = None,
    *,
    param_dtype: Any = None,
    bad_values: str = ERROR,
    **options: Any,
) -> flax_nnx.ResNet:
    """Linen variables ``{'params', 'batch_stats'}`` -> a ``resnet_flax.nnx.ResNet`` holding them.

    Checked as ``flax_to_torch`` checks them: every missing, unexpected or misshapen path raises
    ConversionError naming all of them. ``param_dtype``, ``target`` and ``options`` (e.g. ``dtype``,
    the computation dtype) as in ``weights_to_nnx``.
    """
    weights = check_flax_variables(variables, bad_values=bad_values, stacklevel=2)
    return weights_to_nnx(weights, target, param_dtype=param_dtype, **options)


def torch_to_nnx(
    obj: Any,
    target: flax_nnx.ResNet | None = None,
    *,
    param_dtype: Any = None,
    bad_values: str = ERROR,
    **options: Any,
) -> flax_nnx.ResNet:
    """A PyTorch ResNet's weights -> a ``resnet_flax.nnx.ResNet`` holding them.

    ``obj`` is what ``parity.torch_to_flax`` takes (a state dict, an ``nn.Module``, named pairs; any
    layout of ``parity.conversion.names``), checked the same way, ``bad_values`` included. Without
    ``target`` the model is built abstractly for the architecture the keys describe and comes back
    in eval mode; a ``target`` (e.g. ``nnx.eval_shape(lambda: resnet_flax.nnx.resnet50(num_classes=1000,
    rngs=nnx.Rngs(0)))``) is checked against its own architecture and filled in place, in its own
    dtypes: the weights are cast to them (``torch_to_flax``'s linen ``target``, a module without
    arrays, gives the architecture only). ``param_dtype`` and ``options`` (e.g. ``dtype``, the
    computation dtype) as in ``weights_to_nnx``.
    """
    # Checked in torch's names against the linen model of the target's architecture, then against the target.
    flax_target = None if target is None else nnx_spec(target).flax_model()
    weights = check_state_dict(obj, flax_target, bad_values=bad_values, stacklevel=2)
    return weights_to_nnx(weights, target, param_dtype=param_dtype, **options)


def nnx_to_torch(
    model: flax_nnx.ResNet, layout: str = SEED, *, param_dtype: Any = None, bad_values: str = ERROR
) -> collections.OrderedDict[str, torch.Tensor]:
    """An NNX ResNet's weights -> a torch state dict in ``layout``'s names, as ``flax_to_torch``."""
    return check_nnx(model, bad_values=bad_values, stacklevel=2).to_torch(layout, param_dtype)
