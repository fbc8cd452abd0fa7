"""The one rule over names between torch state dicts and Flax trees, with one transform per leaf kind.

The module path is shared (``conv2_x.0.shortcut.1`` is ``('conv2_x', '0', 'shortcut', '1')``); each
leaf kind has one name on either side and one axis permutation (``LEAF_RULES``). Nothing here
checks anything: ``parity.conversion.convert`` validates whole checkpoints by this rule, and the
parity checks use ``torch_layout`` to compare Flax results with torch's, so a NaN or a broken tree
is still compared (and diagnosed by stage) rather than refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from resnet_arch import BN_COUNTER, BN_PARAMS, BN_STATS

# The Flax variables' collections: trained parameters, and BatchNorm's running statistics.
PARAMS, BATCH_STATS = "params", "batch_stats"
COLLECTIONS = (PARAMS, BATCH_STATS)


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

    def flax_path(self, key: str) -> tuple[str, ...]:
        """The Flax path of a seed key of this kind: collection, module path, Flax leaf name."""
        return (self.collection, *seed_module(key)[0].split("."), self.flax_name)

    def flax_shape(self, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The Flax shape of a leaf of this kind with this torch shape."""
        return torch_shape if self.perm is None else tuple(torch_shape[i] for i in self.perm)

    def torch_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The torch shape of a leaf of this kind with this Flax shape."""
        inv = self.inverse_perm()
        return flax_shape if inv is None else tuple(flax_shape[i] for i in inv)


LEAF_RULES: tuple[LeafRule, ...] = (
    # Conv2d weight: torch OIHW, Flax HWIO.
    LeafRule("weight", "kernel", PARAMS, 4, (2, 3, 1, 0)),
    # Linear weight: torch (out, in), Flax (in, out).
    LeafRule("weight", "kernel", PARAMS, 2, (1, 0)),
    # BatchNorm affine parameters (and Linear's bias, named alike on both sides).
    *(LeafRule(t, f, PARAMS, 1, None) for t, f in BN_PARAMS.items()),
    # torch keeps an int64 scalar counter; Flax an int32 one.
    *(LeafRule(t, f, BATCH_STATS, 0 if t == BN_COUNTER else 1, None) for t, f in BN_STATS.items()),
)
BY_TORCH = {(r.torch_name, r.ndim): r for r in LEAF_RULES}
BY_FLAX = {(r.collection, r.flax_name, r.ndim): r for r in LEAF_RULES}


def seed_module(key: str) -> tuple[str, str]:
    """A seed key's module path and leaf name: ``conv1.1.weight`` -> (``conv1.1``, ``weight``)."""
    module, _, leaf = key.rpartition(".")
    return module, leaf


def torch_rule(key: str, ndim: int) -> LeafRule | None:
    """The leaf rule of a seed key with this many dimensions, or None when no rule takes it."""
    return BY_TORCH.get((seed_module(key)[1], ndim)) if seed_module(key)[0] else None


def flax_path(key: str, ndim: int) -> tuple[str, ...] | None:
    """The Flax path of a seed key, or None when no leaf rule takes it."""
    rule = torch_rule(key, ndim)
    return None if rule is None else rule.flax_path(key)


def flax_rule(path: tuple[str, ...], ndim: int) -> tuple[str, LeafRule] | None:
    """A Flax path's seed key and leaf rule, or None when no leaf rule takes it."""
    rule = BY_FLAX.get((path[0], path[-1], ndim)) if len(path) > 2 else None
    return None if rule is None else (".".join([*path[1:-1], rule.torch_name]), rule)


def flax_leaves(variables: Mapping[str, Any]) -> tuple[dict[str, tuple[LeafRule, Any]], list[str]]:
    """A Flax tree's leaves by seed key, each with its rule, and the ``/``-joined paths no rule takes."""
    named, unknown = {}, []
    for path, x in traverse_util.flatten_dict(dict(variables)).items():
        found = flax_rule(tuple(map(str, path)), np.ndim(x))
        if found is None:
            unknown.append("/".join(map(str, path)))
        else:
            named[found[0]] = (found[1], x)
    return named, unknown


def torch_layout(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A Flax tree's leaves as numpy arrays under their seed keys, in torch layout, by the rule alone.

    No leaf is checked (NaN, shapes and missing keys pass through) and leaves no rule takes are left
    out: this is the view the parity checks compare, not a conversion.
    """
    out = {}
    for key, (rule, x) in flax_leaves(variables)[0].items():
        inv = rule.inverse_perm()
        a = np.asarray(x)
        out[key] = a if inv is None else a.transpose(inv)
    return out
