"""Test settings: strict JAX, a fixed seed per test, and the gpu marker's skip."""

from __future__ import annotations

import jax
import pytest
import torch

# Make JAX strict, as Equinox's tests do: implicit rank promotion is an error.
jax.config.update("jax_numpy_rank_promotion", "raise")


def gpu_available() -> bool:
    """A CUDA device visible to both torch and jax."""
    try:
        return torch.cuda.is_available() and any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU visible to both torch and jax")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
