"""Inference-only ResNet: every BatchNorm folded into the convolution before it.

In eval mode BatchNorm is a per-channel affine map, ``y = conv(x) * m + (bias - mean * m)`` with
``m = scale / sqrt(var + eps)``, so it can live in the convolution: kernel ``* m`` and a bias.
That removes one elementwise pass per convolution and lets a conv+bias+ReLU run as one fused op.
The folded tree keeps the model's paths; each convolution gains a ``bias``, BatchNorms vanish.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from resnet_arch import STEM_WIDTH

from .layers import BatchNorm2d, Conv2d
from .model import ResNet
from .ops import BN_BIAS, BN_MEAN, BN_SCALE, BN_VAR, Dtype, Initializer

Array = jax.Array
# Folding is done once, on the host, in float64, so the folded weights carry no extra rounding
# beyond the final cast to the parameter dtype.
FOLD_DTYPE = np.float64
_BN_PARAMS = {BN_SCALE, BN_BIAS}


class FoldedBatchNorm(nn.Module):
    """Where a BatchNorm2d stood: the identity, its affine map now lives in the convolution before it.

    It takes BatchNorm2d's fields so the blocks build it in the same place, and holds no variables.
    """

    num_features: int
    _: dataclasses.KW_ONLY
    # A folded model is inference-only, so the identity starts in eval mode (NNX's FoldedBatchNorm too).
    use_running_average: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    scale_init: Initializer = nn.initializers.ones

    def __call__(self, x: Array) -> Array:
        if not self.use_running_average:
            raise ValueError("a folded ResNet is inference-only: call it with train=False")
        return x


# The convolution of a folded ResNet: its BatchNorm's affine map is in the kernel and a bias.
folded_conv2d = functools.partial(Conv2d, use_bias=True)


def _is_batchnorm(node: Any) -> bool:
    return isinstance(node, Mapping) and set(node) == _BN_PARAMS


def _is_conv(node: Any) -> bool:
    return isinstance(node, Mapping) and set(node) == {"kernel"} and np.ndim(node["kernel"]) == 4


def fold_conv_bn(
    conv_params: Mapping[str, Any], bn_params: Mapping[str, Any], bn_stats: Mapping[str, Any], epsilon: float
) -> dict[str, Any]:
    """One convolution's ``{"kernel"}`` (HWIO) and the eval-mode BatchNorm after it (its ``scale``/``bias``
    and its statistics' ``mean``/``var``) -> ``{"kernel", "bias"}`` of one biased convolution with the
    same output, in the kernel's dtype."""
    dtype = jnp.asarray(conv_params["kernel"]).dtype
    kernel = np.asarray(conv_params["kernel"], FOLD_DTYPE)
    scale, bias = np.asarray(bn_params[BN_SCALE], FOLD_DTYPE), np.asarray(bn_params[BN_BIAS], FOLD_DTYPE)
    mean, var = np.asarray(bn_stats[BN_MEAN], FOLD_DTYPE), np.asarray(bn_stats[BN_VAR], FOLD_DTYPE)
    mul = scale / np.sqrt(var + epsilon)
    # HWIO kernel: the output channel is the last axis, so mul broadcasts over it.
    return {"kernel": jnp.asarray(kernel * mul, dtype), "bias": jnp.asarray(bias - mean * mul, dtype)}


def _fold_tree(params: Mapping[str, Any], stats: Mapping[str, Any], eps: float, path: str) -> dict[str, Any]:
    """Fold every (conv "i", BatchNorm "i+1") pair under params; copy everything else."""
    out: dict[str, Any] = {}
    for name, node in params.items():
        where = f"{path}/{name}" if path else name
        if _is_batchnorm(node):
            previous = str(int(name) - 1) if name.isdigit() else None
            if previous is None or not _is_conv(params.get(previous)):
                raise ValueError(f"BatchNorm at {where} does not follow a convolution; cannot fold it")
        elif _is_conv(node):
            following = str(int(name) + 1) if name.isdigit() else None
            if following is None or not _is_batchnorm(params.get(following)):
                raise ValueError(f"convolution at {where} has no BatchNorm after it; cannot fold it")
            bn_stats = stats.get(following)
            if not isinstance(bn_stats, Mapping) or not {BN_MEAN, BN_VAR} <= set(bn_stats):
                bn_where = f"{path}/{following}" if path else following
                raise ValueError(f"batch_stats has no {BN_MEAN}/{BN_VAR} for the BatchNorm at {bn_where}")
            out[name] = fold_conv_bn(node, params[following], bn_stats, eps)
        elif isinstance(node, Mapping) and not set(node) <= {"kernel", "bias"}:
            out[name] = _fold_tree(node, stats.get(name, {}), eps, where)
        else:
            out[name] = dict(node) if isinstance(node, Mapping) else node
    return out


def is_folded(model: ResNet) -> bool:
    """Whether ``fold`` made this model (its BatchNorms live in the convolutions)."""
    return model.norm is FoldedBatchNorm


def check_unfolded(model: Any, what: str) -> None:
    """TypeError unless ``model`` is a resnet_flax.ResNet whose BatchNorms are not folded (``what`` needs one)."""
    if not isinstance(model, ResNet):
        raise TypeError(f"{what} expects a resnet_flax.ResNet, got {type(model).__name__}")
    if is_folded(model):
        raise TypeError(f"{what} expects a resnet_flax.ResNet whose BatchNorms are not folded")


def fold(model: ResNet, variables: Mapping[str, Any]) -> tuple[ResNet, dict[str, Any]]:
    """An inference-only ResNet (``model`` with the folded layer kinds) and its ``{'params': ...}``
    that give ``model``'s eval logits.

    ``variables`` are the model's concrete ``{'params', 'batch_stats'}``; parameter dtypes are kept.
    The BatchNorm epsilon is the model's own (its ``norm`` layer kind's ``epsilon``).
    """
    check_unfolded(model, "fold")
    if not isinstance(variables, Mapping) or not {"params", "batch_stats"} <= set(variables):
        got = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(f"fold expects variables with 'params' and 'batch_stats', got {got}")
    # Any width: every BatchNorm of the model is built from this one layer kind.
    epsilon = cast(BatchNorm2d, model.norm(STEM_WIDTH)).epsilon
    return model.clone(conv=folded_conv2d, norm=FoldedBatchNorm), {
        "params": _fold_tree(variables["params"], variables["batch_stats"], epsilon, "")
    }
