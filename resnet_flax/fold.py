"""Inference-only ResNet: every BatchNorm folded into the convolution before it.

In eval mode BatchNorm is a per-channel affine map, ``y = conv(x) * m + (bias - mean * m)`` with
``m = scale / sqrt(var + eps)``, so it can live in the convolution: kernel ``* m`` and a bias.
That removes one elementwise pass per convolution and lets a conv+bias+ReLU run as one fused op.
The folded tree keeps the model's paths; each convolution gains a ``bias``, BatchNorms vanish.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from .layers import TORCH_BN_EPS, Conv2d, Dtype, Initializer
from .model import ResNet, rebuild

Array = jax.Array
# Folding is done once, on the host, in float64, so the folded weights carry no extra rounding
# beyond the final cast to the parameter dtype.
FOLD_DTYPE = np.float64


class BiasedConv2d(Conv2d):
    """Conv2d plus a per-output-channel ``bias``: a convolution with its BatchNorm folded in."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = super().__call__(x)
        bias = self.param("bias", nn.initializers.zeros, (self.out_channels,), self.param_dtype)
        return y + bias.astype(y.dtype).reshape((1,) * (y.ndim - 1) + (self.out_channels,))


class FoldedBatchNorm(nn.Module):
    """Where a BatchNorm2d stood: the identity, its affine map now lives in the convolution before it.

    It takes BatchNorm2d's fields so the blocks build it in the same place, and holds no variables.
    """

    num_features: int
    use_running_average: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    scale_init: Initializer = nn.initializers.ones

    def __call__(self, x: Array) -> Array:
        if not self.use_running_average:
            raise ValueError("a folded ResNet is inference-only: call it with train=False")
        return x


class FoldedResNet(ResNet):
    """ResNet with BatchNorm folded into the convolutions; build it with ``fold``, apply it with train=False."""

    conv_layer: ClassVar[type[nn.Module]] = BiasedConv2d
    norm_layer: ClassVar[type[nn.Module]] = FoldedBatchNorm


def _is_batchnorm(node: Any) -> bool:
    return isinstance(node, Mapping) and set(node) == {"scale", "bias"}


def _is_conv(node: Any) -> bool:
    return isinstance(node, Mapping) and set(node) == {"kernel"} and np.ndim(node["kernel"]) == 4


def _fold_pair(conv: Mapping[str, Any], bn: Mapping[str, Any], stats: Mapping[str, Any], eps: float) -> dict[str, Any]:
    """One convolution and the BatchNorm after it -> a biased convolution with the same eval output."""
    dtype = jnp.asarray(conv["kernel"]).dtype
    kernel = np.asarray(conv["kernel"], FOLD_DTYPE)
    scale, bias = np.asarray(bn["scale"], FOLD_DTYPE), np.asarray(bn["bias"], FOLD_DTYPE)
    mean, var = np.asarray(stats["mean"], FOLD_DTYPE), np.asarray(stats["var"], FOLD_DTYPE)
    mul = scale / np.sqrt(var + eps)
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
            if not isinstance(bn_stats, Mapping) or not {"mean", "var"} <= set(bn_stats):
                bn_where = f"{path}/{following}" if path else following
                raise ValueError(f"batch_stats has no mean/var for the BatchNorm at {bn_where}")
            out[name] = _fold_pair(node, params[following], bn_stats, eps)
        elif isinstance(node, Mapping) and not set(node) <= {"kernel", "bias"}:
            out[name] = _fold_tree(node, stats.get(name, {}), eps, where)
        else:
            out[name] = dict(node) if isinstance(node, Mapping) else node
    return out


def fold(
    model: ResNet, variables: Mapping[str, Any], *, epsilon: float = TORCH_BN_EPS
) -> tuple[FoldedResNet, dict[str, Any]]:
    """An inference-only FoldedResNet and its ``{'params': ...}`` that give ``model``'s eval logits.

    ``variables`` are the model's concrete ``{'params', 'batch_stats'}``; parameter dtypes are kept.
    """
    if not isinstance(model, ResNet) or isinstance(model, FoldedResNet):
        raise TypeError(f"fold expects a resnet_flax.ResNet (not yet folded), got {type(model).__name__}")
    if not isinstance(variables, Mapping) or not {"params", "batch_stats"} <= set(variables):
        got = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(f"fold expects variables with 'params' and 'batch_stats', got {got}")
    return rebuild(model, FoldedResNet), {
        "params": _fold_tree(variables["params"], variables["batch_stats"], epsilon, "")
    }
