"""Weights between resnet_torch, the linen variables and ``resnet_flax.nnx`` models, by the one name rule.

An NNX model's state has the paths of the linen variables, its ``nnx.Param`` leaves are the
``params`` collection and its ``nnx.BatchStat`` leaves ``batch_stats``; so every conversion goes
through the linen variables tree and ``parity.conversion.convert``: the same rule over names, the same
whole-tree check naming every missing, unexpected or misshapen key before anything is converted.
Models are built abstractly (``nnx.eval_shape``: shapes only, no initial weights drawn) and then
filled, so a conversion draws no random numbers and allocates each weight once.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

import torch
from flax import nnx, traverse_util

from resnet_arch import HEAD
from resnet_flax import nnx as flax_nnx

from .arch import ArchSpec
from .convert import FlaxWeights, TorchWeights, Variables, _check, check_flax_variables, check_state_dict
from .names import SEED

# The Variable types of an NNX ResNet and the linen collections they are.
COLLECTIONS: dict[type[nnx.Variable], str] = {nnx.Param: "params", nnx.BatchStat: "batch_stats"}


def nnx_spec(model: flax_nnx.ResNet) -> ArchSpec:
    """The architecture of an NNX ResNet (concrete or from ``nnx.eval_shape``), read from its options."""
    if not isinstance(model, flax_nnx.ResNet):
        raise TypeError(f"expected a resnet_flax.nnx.ResNet, got {type(model).__name__}")
    return ArchSpec(model.block.__name__, tuple(model.num_block), model.num_classes, model.small_stem)


def nnx_model(spec: ArchSpec, **options: Any) -> flax_nnx.ResNet:
    """An abstract NNX ResNet of this architecture (``nnx.eval_shape``: its variables are shapes, no
    weights are drawn), with the builder's other options (``dtype``, ``param_dtype``, ``precision``)."""
    block = flax_nnx.BLOCKS[spec.block]
    return nnx.eval_shape(
        lambda: flax_nnx.ResNet(block, spec.num_block, **spec.model_kwargs(), **options, rngs=nnx.Rngs(0))
    )


def _collection(variable: nnx.Variable) -> str:
    """The linen collection of a Variable; other types keep their class name (and are reported)."""
    return next((name for kind, name in COLLECTIONS.items() if isinstance(variable, kind)), type(variable).__name__)


def _flat_state(model: nnx.Module) -> dict[tuple[str, ...], nnx.Variable]:
    """{(collection, *path): Variable} for every Variable of the model."""
    return {(_collection(v), *map(str, path)): v for path, v in nnx.to_flat_state(nnx.state(model))}


def check_nnx(model: flax_nnx.ResNet) -> FlaxWeights:
    """Check an NNX ResNet's state once, as ``check_flax_variables`` checks linen variables.

    A Variable no rule takes (a folded model's biases, another type) or a missing one raises
    ConversionError naming every path.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"expected an NNX module, got {type(model).__name__}")
    flat = {path: v.get_value() for path, v in _flat_state(model).items()}
    return check_flax_variables(traverse_util.unflatten_dict(flat), stacklevel=2)


def nnx_to_linen(model: flax_nnx.ResNet) -> Variables:
    """An NNX ResNet's state as linen variables ``{'params': ..., 'batch_stats': ...}`` (the same arrays)."""
    return check_nnx(model).to_flax()


def _fill(model: flax_nnx.ResNet, variables: Mapping[str, Any]) -> flax_nnx.ResNet:
    """Put ``variables`` into the model's Variables, after checking every path and shape against it."""
    expected = {"/".join(p): tuple(v.get_value().shape) for p, v in _flat_state(model).items()}
    flat = traverse_util.flatten_dict(dict(variables))
    got = {"/".join(p): tuple(x.shape) for p, x in flat.items()}
    _check(got, expected, f"the target {type(model).__name__}", lambda key, shape: key)
    nnx.update(model, traverse_util.unflatten_dict({path[1:]: x for path, x in flat.items()}))
    return model


def _filled(
    spec: ArchSpec, variables: Variables, target: flax_nnx.ResNet | None, options: Mapping[str, Any]
) -> flax_nnx.ResNet:
    """``target`` filled in place, or a new abstract model of ``spec`` filled and put in eval mode."""
    if target is not None:
        return _fill(target, variables)
    param_dtype = variables["params"][HEAD]["kernel"].dtype
    model = _fill(nnx_model(spec, **{"param_dtype": param_dtype, **options}), variables)
    model.eval()
    return model


def weights_to_nnx(
    weights: TorchWeights | FlaxWeights, target: flax_nnx.ResNet | None = None, **options: Any
) -> flax_nnx.ResNet:
    """Checked weights (``check_state_dict``, ``check_flax_variables``) -> a ``resnet_flax.nnx.ResNet``.

    Without ``target`` the model is built abstractly for the weights' architecture, with ``options``
    for the builder (``param_dtype`` defaults to the weights'), and comes back in eval mode. A
    ``target`` (e.g. from ``nnx.eval_shape``) is filled in place and keeps its mode.
    """
    return _filled(weights.spec, weights.to_flax(), target, options)


def linen_to_nnx(
    variables: Mapping[str, Any], target: flax_nnx.ResNet | None = None, **options: Any
) -> flax_nnx.ResNet:
    """Linen variables ``{'params', 'batch_stats'}`` -> a ``resnet_flax.nnx.ResNet`` holding them (dtypes kept).

    As ``weights_to_nnx``; every missing, unexpected or misshapen path raises ConversionError naming
    all of them.
    """
    return weights_to_nnx(check_flax_variables(variables, stacklevel=2), target, **options)


def torch_to_nnx(obj: Any, target: flax_nnx.ResNet | None = None, *, dtype: Any = None) -> flax_nnx.ResNet:
    """A PyTorch ResNet's weights -> a ``resnet_flax.nnx.ResNet`` holding them.

    ``obj`` is what ``parity.torch_to_flax`` takes (a state dict, an ``nn.Module``, named pairs; any
    layout of ``parity.conversion.names``), checked the same way; ``dtype`` casts the floating-point tensors.
    Without ``target`` the model is built abstractly for the architecture the keys describe and
    comes back in eval mode; a ``target`` (e.g. ``nnx.eval_shape(lambda: resnet_flax.nnx.resnet50(
    num_classes=1000, rngs=nnx.Rngs(0)))``) is checked against its own architecture and filled in place.
    """
    # Checked in torch's names against the linen model of the target's architecture, then against the target.
    flax_target = None if target is None else nnx_spec(target).flax_model()
    weights = check_state_dict(obj, flax_target, stacklevel=2)
    return _filled(weights.spec, weights.to_flax(dtype), target, {})


def nnx_to_torch(
    model: flax_nnx.ResNet, layout: str = SEED, *, dtype: Any = None
) -> collections.OrderedDict[str, torch.Tensor]:
    """An NNX ResNet's weights -> a torch state dict in ``layout``'s names, as ``flax_to_torch``."""
    return check_nnx(model).to_torch(layout, dtype)
