"""Parity checks: the same weights in resnet_torch and resnet_flax must compute the same function.

Eval logits (``run``), train-mode logits, running statistics, gradients and SGD steps (``train``)
compared in a precision mode (``precision``, tolerances in ``precision.MODES``) on a ``pairs.Pair``
whose Flax side is linen (``linen``) or NNX (``nnx``) behind one interface (``side.FlaxSide``);
``compare`` measures the errors and ``report`` prints and saves them. The public names below are
imported on first use, so ``parity.checks.optim`` (the trainer's optimizer) pulls in no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .compare import CheckResult
    from .pairs import Pair, make_pair, pair_of
    from .run import check_pair, run_checks

_HOMES = {
    "CheckResult": "compare",
    "Pair": "pairs",
    "make_pair": "pairs",
    "pair_of": "pairs",
    "check_pair": "run",
    "run_checks": "run",
}

__all__ = ["CheckResult", "Pair", "check_pair", "make_pair", "pair_of", "run_checks"]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
