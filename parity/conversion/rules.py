"""The one rule over names between torch state dicts and Flax trees, with one transform per leaf kind.

The module path is shared (``conv2_x.0.shortcut.1`` is ``('conv2_x', '0', 'shortcut', '1')``); each
leaf kind has one name on either side and one axis permutation (``LEAF_RULES``). Nothing here
checks anything: ``parity.conversion.convert`` validates whole checkpoints, and the parity checks
use ``torch_layout`` to compare Flax results with torch's, so a NaN or a broken tree is still
compared (and diagnosed by stage) rather than refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from resnet_arch import BN_COUNTER, BN_PARAMS, BN_STATS


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
    # BatchNorm affine parameters (and Linear's bias, named alike on both sides).
    *(LeafRule(t, f, "params", 1, None) for t, f in BN_PARAMS.items()),
    # torch keeps an int64 scalar counter; Flax an int32 one.
    *(LeafRule(t, f, "batch_stats", 0 if t == BN_COUNTER else 1, None) for t, f in BN_STATS.items()),
)
BY_TORCH = {(r.torch_name, r.ndim): r for r in LEAF_RULES}
BY_FLAX = {(r.collection, r.flax_name, r.ndim): r for r in LEAF_RULES}


def seed_module(key: str) -> tuple[str, str]:
    """A seed key's module path and leaf name: ``conv1.1.weight`` -> (``conv1.1``, ``weight``)."""
    module, _, leaf = key.rpartition(".")
    return module, leaf


def flax_path(key: str, ndim: int) -> tuple[str, ...] | None:
    """The Flax path of a seed key, or None when no leaf rule takes it."""
    module, leaf = seed_module(key)
    rule = BY_TORCH.get((leaf, ndim))
    return None if rule is None or not module else (rule.collection, *module.split("."), rule.flax_name)


def flax_rule(path: tuple[str, ...], ndim: int) -> tuple[str, LeafRule] | None:
    """A Flax path's seed key and leaf rule, or None when no leaf rule takes it."""
    rule = BY_FLAX.get((path[0], path[-1], ndim)) if len(path) > 2 else None
    return None if rule is None else (".".join([*path[1:-1], rule.torch_name]), rule)


def torch_layout(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A Flax tree's leaves as numpy arrays under their seed keys, in torch layout, by the rule alone.

    No leaf is checked (NaN, shapes and missing keys pass through) and leaves no rule takes are left
    out: this is the view the parity checks compare, not a conversion.
    """
    out = {}
    for path, x in traverse_util.flatten_dict(dict(variables)).items():
        named = flax_rule(tuple(map(str, path)), np.ndim(x))
        if named is not None:
            key, rule = named
            inv = rule.inverse_perm()
            a = np.asarray(x)
            out[key] = a if inv is None else a.transpose(inv)
    return out
