"""Checked weights of one ResNet, whichever framework they came from, and the two ways out of them.

``Weights`` holds what ``parity.conversion.convert``'s checks found: the architecture, every leaf
under its seed key in model order (as given: torch tensors, or jax/numpy arrays of a Flax tree), and
the BatchNorm counters' checked values. ``to_flax`` and ``to_torch`` give the weights in either
framework, converting each leaf by its rule (``parity.conversion.rules``) into fresh memory the
result owns, or handing the leaf over unchanged where its framework and dtype already fit.
``param_dtype`` casts the floating-point weights, as Flax's ``param_dtype`` names the weights' dtype.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import traverse_util

from resnet_arch import DTYPES, LINEN
from resnet_flax.ops import COUNTER_DTYPE

from .arch import ArchSpec
from .arrays import aligned_empty, numpy_dtype, numpy_to_torch, one_torch_thread, permuted_copy, to_jax, torch_dtype
from .files import TORCH
from .names import SEED, check_layout, count_stem_convs, from_seed
from .rules import BY_TORCH, LeafRule, seed_module
from .validate import ConversionError

Variables = dict[str, Any]
TORCH_COUNTER_DTYPE = torch.int64  # what torch.nn.BatchNorm2d registers


def param_cast(param_dtype: Any) -> np.dtype | None:
    """The numpy dtype a ``param_dtype=`` option casts the weights to; ValueError unless it is a weight dtype."""
    if param_dtype is None:
        return None
    try:
        cast = numpy_dtype(param_dtype)
    except (TypeError, ValueError):
        cast = None
    if cast is None or cast.name not in DTYPES.values():
        raise ValueError(
            f"param_dtype casts floating-point weights: one of {', '.join(DTYPES.values())}, got {param_dtype}"
        )
    return cast


def _check_x64(dtypes: Iterable[tuple[str, np.dtype]]) -> None:
    if jax.dtypes.canonicalize_dtype(np.float64) == np.float64:  # x64 on, globally or in a context
        return
    wide = [k for k, d in dtypes if d == np.float64]
    if wide:
        raise ConversionError(
            f"{len(wide)} float64 tensors (e.g. {wide[0]}) need jax.config.update('jax_enable_x64', True) "
            "to stay float64, or pass param_dtype=torch.float32 to cast them"
        )


def _rule(key: str, t: torch.Tensor) -> LeafRule:
    """The rule of a leaf of checked weights (every one has a rule)."""
    return BY_TORCH[(seed_module(key)[1], t.dim())]


def _to_flax_axes(rule: LeafRule, t: torch.Tensor, cast: np.dtype | None) -> np.ndarray:
    """One torch leaf in Flax layout, in fresh aligned host memory (which jax adopts without a copy)."""
    out = aligned_empty(rule.flax_shape(tuple(t.shape)), cast if cast is not None else numpy_dtype(t.dtype))
    permuted_copy(t, rule.perm, numpy_to_torch(out))
    return out


def _to_torch_axes(rule: LeafRule, src: torch.Tensor, cast: torch.dtype | None) -> torch.Tensor:
    """One Flax leaf (viewed as a tensor) in torch layout, in fresh memory the tensor owns."""
    out = torch.empty(rule.torch_shape(tuple(src.shape)), dtype=cast if cast is not None else src.dtype)
    permuted_copy(src, rule.inverse_perm(), out)
    return out


@dataclasses.dataclass(frozen=True)
class Weights:
    """A checked checkpoint: its architecture and its leaves by seed key in model order, from either framework."""

    spec: ArchSpec
    source: str  # TORCH or LINEN: the framework the leaves came from, and so their axis order
    leaves: collections.OrderedDict[str, Any]  # seed key -> the leaf as given (torch tensor, jax or numpy array)
    views: collections.OrderedDict[str, torch.Tensor]  # seed key -> the leaf's host memory as a tensor
    counters: dict[str, int]  # seed key -> the checked value of each BatchNorm counter

    def to_flax(self, param_dtype: Any = None) -> Variables:
        """The Flax variables tree as jax arrays; floating-point leaves cast to ``param_dtype`` if given.

        Leaves of a Flax tree that need no cast are the arrays given; torch leaves are fresh arrays.
        """
        cast = param_cast(param_dtype)
        _check_x64((k, cast or numpy_dtype(t.dtype)) for k, t in self.views.items() if k not in self.counters)
        paths = {key: _rule(key, t).flax_path(key) for key, t in self.views.items()}
        given: dict[tuple[str, ...], jax.Array] = {}  # a Flax tree's leaves, cast where asked
        fresh: dict[tuple[str, ...], np.ndarray] = {}  # counters and torch leaves, adopted by jax in one call
        with one_torch_thread():
            for key, t in self.views.items():
                if key in self.counters:
                    fresh[paths[key]] = np.asarray(self.counters[key], COUNTER_DTYPE)
                elif self.source == LINEN:
                    x = self.leaves[key]
                    given[paths[key]] = jnp.asarray(x, cast or x.dtype)
                else:
                    fresh[paths[key]] = _to_flax_axes(_rule(key, t), t.cpu(), cast)
        adopted = to_jax(fresh)
        return traverse_util.unflatten_dict({p: adopted[p] if p in adopted else given[p] for p in paths.values()})

    def to_torch(self, layout: str = SEED, param_dtype: Any = None) -> collections.OrderedDict[str, torch.Tensor]:
        """The state dict in ``layout``'s names; floating-point tensors cast to ``param_dtype`` if given.

        Tensors of a torch checkpoint that need no cast are the tensors given; Flax leaves are fresh tensors.
        """
        check_layout(layout)
        try:
            self.spec.check_layout(layout)
        except ValueError as e:
            raise ConversionError(str(e)) from None
        cast = param_cast(param_dtype)
        target = None if cast is None else torch_dtype(cast)
        stem_convs = count_stem_convs(self.views)
        out = collections.OrderedDict()
        with one_torch_thread():
            for key, t in self.views.items():
                if key in self.counters:
                    value = torch.tensor(self.counters[key], dtype=TORCH_COUNTER_DTYPE)
                elif self.source == TORCH:
                    value = self.leaves[key] if target is None else self.leaves[key].to(target)
                else:
                    value = _to_torch_axes(_rule(key, t), t, target)
                out[from_seed(key, layout, stem_convs)] = value
        return out
