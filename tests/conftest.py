"""Test settings: one compilation cache per session, a cheaper LLVM optimisation level, strict JAX, a fixed
seed per test, the gpu marker's skip, and how pytest-xdist's workers share the tests and the cores."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Any

# Before jax is imported, here and in every process a test starts (they inherit the environment): the
# tests compile the same small models again and again (dozens of resnet-train runs), and XLA's
# executables from a persistent cache make a warm trainer start about twice as fast on 2 CPU cores.
# The cache lives for this session only (pytest-xdist's workers share the controller's), so no test
# can pass on a program compiled by another version; one set by the caller is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="resnet-parity-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
# The tests' programs are small and run a few steps each, so compiling them dominates: LLVM's -O1 instead of
# -O2 costs a quarter less CPU in compilation, and the arithmetic is the same (XLA:CPU does no fast-math).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=1".strip()
# On pytest-xdist's workers (pyproject's addopts: one per core) each computes on one thread, as do the processes
# its tests start: threads of two workers competing for the same cores cost more than they bring.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = "1"  # torch's intra-op threads
    os.environ["XLA_FLAGS"] += " --xla_cpu_multi_thread_eigen=false"  # XLA:CPU's convolutions and dot products

import jax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# Make JAX strict, as Equinox's tests do: implicit rank promotion is an error.
jax.config.update("jax_numpy_rank_promotion", "raise")


# A small digits run (8x8, 192 training images, 90 held out): seconds on the CPU, and enough to learn and export.
TINY_RUN = dict(image_size=8, train_limit=192, test_fraction=0.05, batch_size=16, lr=0.02, progress=False)
# The same run as `resnet-train` flags.
TINY_FLAGS = ["--image-size", "8", "--train-limit", "192", "--test-fraction", "0.05", "--batch-size", "16"]
TINY_FLAGS += ["--no-progress"]


@pytest.fixture(scope="session")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict]:
    """Four epochs of TINY_RUN in one go, exported to PyTorch: (its TrainConfig, fit's result), shared by the
    training and export tests."""
    from resnet_train.config import TrainConfig
    from resnet_train.loop import fit

    config = TrainConfig(**{**TINY_RUN, "run_dir": str(tmp_path_factory.mktemp("straight")), "epochs": 4})
    return config, fit(config)


def gpu_available() -> bool:
    """A CUDA device visible to both torch and jax."""
    try:
        return torch.cuda.is_available() and any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


# pytest-xdist's workers (pyproject's addopts) take a module at a time, with its module fixtures; every module that
# uses the session's trained run (`straight`) goes to one worker, so it trains once. The longest groups start first,
# so that the workers finish together (an outdated list costs balance, never a result).
SHARED_RUN = "straight"
LONGEST_FIRST = (SHARED_RUN, "test_multiprocess.py", "test_train_faults.py", "test_parity.py", "test_fused.py")
LONGEST_FIRST += ("test_throughput.py", "test_gpu_check.py", "test_nnx.py", "test_train_stream.py", "test_train_nnx.py")


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto`: no workers where a CUDA GPU is visible (its tests share the one GPU, in this process); elsewhere
    pytest-xdist's own count, one per core."""
    return 0 if torch.cuda.is_available() else None


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    sharing = {item.path for item in items if SHARED_RUN in getattr(item, "fixturenames", ())}
    groups = {item: SHARED_RUN if item.path in sharing else item.path.name for item in items}
    for item, group in groups.items():
        item.add_marker(pytest.mark.xdist_group(group))
    rank = {group: i for i, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(groups[item], len(rank)))
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU visible to both torch and jax")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
