"""Parity results as a text table and as a JSON file (written to a temporary name, then renamed)."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..conversion.atomic import atomic_write
from .compare import CheckResult

COLUMNS = (
    "arch",
    "precision",
    "check",
    "max abs error",
    "relative error",
    "tolerance",
    "torch vs fp64",
    "pass",
    "first diverging stage",
)
_WIDTHS = (16, 9, 14, 13, 14, 9, 13, 4, 21)


def _row(cells: Iterable[str]) -> str:
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, _WIDTHS, strict=True)).rstrip()


def header() -> str:
    """The table's column titles and rule."""
    return _row(COLUMNS) + "\n" + _row("-" * w for w in _WIDTHS)


def format_result(r: CheckResult) -> str:
    """One table row: errors in scientific notation, PASS/FAIL, and the diverging stage of a failure."""
    stage = r.first_diverging or ("-" if r.passed else "none (every stage within tolerance)")
    floor = f"{r.floor:.3e}" if r.floor else "-"
    errors = (f"{r.max_abs:.3e}", f"{r.rel:.3e}", f"{r.tol:.0e}", floor)
    return _row((r.arch, r.precision, r.check, *errors, "PASS" if r.passed else "FAIL", stage))


def format_error(arch: str, precision: str, error: BaseException) -> str:
    """A row for a run that raised instead of producing results."""
    return _row((arch, precision, "error", "-", "-", "-", "-", "FAIL", f"{type(error).__name__}: {error}"))


def versions() -> dict[str, str]:
    """Versions of the libraries and interpreter behind the numbers."""
    import flax
    import jax
    import optax
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "jax_backend": jax.default_backend(),
        "torch_cuda": str(torch.version.cuda),
    }


def write_json(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> None:
    """Write payload as JSON to a temporary file beside path, then rename it into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(payload, indent=2, allow_nan=True) + "\n").encode()
    atomic_write(target, lambda f: f.write(data))
