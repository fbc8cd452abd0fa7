"""The package layers hold: each model imports only its own framework, nothing imports the trainer.

Layers, each importing only what is below it: ``resnet_arch`` (no framework) -> ``resnet_torch``
(torch) and ``resnet_flax`` (jax/flax), side by side -> ``parity`` (both models) ->
``resnet_train`` (models and parity). ``resnet_data``, the image input pipeline (numpy, PIL and
Grain; neither framework), sits beside the models, under the trainer. Benchmarks and scripts sit
beside the trainer and may not import it either.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

FIRST_PARTY = ("resnet_arch", "resnet_torch", "resnet_flax", "resnet_data", "parity", "resnet_train", "benchmarks")
TORCH_SIDE = ("torch", "torchvision", "torchinfo")
JAX_SIDE = ("jax", "jaxlib", "flax", "optax", "orbax")

# package -> (first-party packages it may import, third-party packages it must not import)
ALLOWED: dict[str, tuple[set[str], tuple[str, ...]]] = {
    "resnet_arch": (set(), TORCH_SIDE + JAX_SIDE),
    "resnet_torch": ({"resnet_arch"}, JAX_SIDE),
    "resnet_flax": ({"resnet_arch"}, TORCH_SIDE),
    "resnet_data": (set(), TORCH_SIDE + JAX_SIDE),
    # resnet_data for the image normalisation an exported model records.
    "parity": ({"resnet_arch", "resnet_torch", "resnet_flax", "resnet_data"}, ()),
    "resnet_train": ({"resnet_arch", "resnet_torch", "resnet_flax", "resnet_data", "parity"}, ()),
    # resnet_train: a published training figure is the trainer's own step.
    "benchmarks": ({"resnet_arch", "resnet_torch", "resnet_flax", "resnet_data", "parity", "resnet_train"}, ()),
}


def _sources(package: str) -> list[Path]:
    single = REPO / f"{package}.py"
    return [single] if single.exists() else sorted((REPO / package).rglob("*.py"))


def _imported_roots(path: Path) -> set[str]:
    """Top-level names of every absolute import in a file, at any depth (lazy imports included)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_layers(package: str) -> None:
    allowed, forbidden = ALLOWED[package]
    sources = _sources(package)
    assert sources, f"no sources found for {package}"
    bad = []
    for path in sources:
        for root in sorted(_imported_roots(path)):
            first_party_breach = root in FIRST_PARTY and root != package and root not in allowed
            if first_party_breach or root in forbidden:
                bad.append(f"{path.relative_to(REPO)} imports {root}")
    assert not bad, (
        f"{package} may import {sorted(allowed) or 'no first-party package'} and none of {forbidden}:\n"
        + "\n".join(bad)
    )


def test_the_layer_table_names_every_first_party_package() -> None:
    """A new top-level package must be placed in ALLOWED, so its imports are checked too."""
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} | {p.stem for p in REPO.glob("*.py")}
    assert packages - {"tests", "scripts", "setup"} <= set(ALLOWED)


def _run_without(blocked: tuple[str, ...], code: str) -> subprocess.CompletedProcess[str]:
    """Run code in a fresh interpreter where importing any of ``blocked`` raises ImportError."""
    guard = textwrap.dedent(
        f"""
        import sys
        BLOCKED = {blocked!r}

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is blocked in this test")
                return None

        sys.meta_path.insert(0, Block())
        """
    )
    return subprocess.run(
        [sys.executable, "-c", guard + textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_resnet_flax_works_without_torch() -> None:
    proc = _run_without(
        TORCH_SIDE,
        """
        import jax, jax.numpy as jnp
        import resnet_flax
        from resnet_flax import fold, fused, preprocess, show
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch imported despite the block")
        model = resnet_flax.resnet18(num_classes=3, small_stem=True)
        x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
        variables = model.init(jax.random.key(1), x)
        logits = model.apply(variables, x)
        assert logits.shape == (2, 3), logits.shape
        assert "torch" not in sys.modules
        print("ok", logits.shape)
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ok (2, 3)" in proc.stdout


def test_resnet_torch_works_without_jax() -> None:
    proc = _run_without(
        JAX_SIDE,
        """
        import torch
        import resnet_torch
        from resnet_torch import show
        model = resnet_torch.resnet18(num_classes=3, small_stem=True).eval()
        with torch.no_grad():
            logits = model(torch.randn(2, 3, 16, 16))
        assert logits.shape == (2, 3), logits.shape
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
        print("ok", tuple(logits.shape))
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ok (2, 3)" in proc.stdout


def test_resnet_arch_imports_no_framework() -> None:
    proc = _run_without(TORCH_SIDE + JAX_SIDE, "import resnet_arch; print(len(resnet_arch.DEPTHS))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "5"
