"""BatchNorm folding: the folded inference model gives the unfolded model's eval logits."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax.fold import FoldedBatchNorm, fold, is_folded
from resnet_flax.layers import BatchNorm2d
from resnet_flax.model import BLOCKS, ResNet

ODD_SIZE = (33, 47)


def _rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _model(kind: str, dtype: Any, **kw: Any) -> ResNet:
    """A small ResNet of each block type, one block per stage (every stage still projects)."""
    block = BLOCKS["BasicBlock" if kind == "basic" else "BottleNeck"]
    return ResNet(block, (1, 1, 1, 1), num_classes=7, dtype=dtype, param_dtype=dtype, **kw)


def _random_variables(model: ResNet, x: jax.Array, seed: int) -> dict[str, Any]:
    """Variables of the model's shapes drawn with numpy (fast): He-scaled kernels, and BatchNorm
    scale, bias, mean and var all drawn away from 1 and 0 so that folding has work to do."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)

    def draw(path: Any, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = path[-1].key
        if name == "kernel":
            value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        elif name in ("bias", "mean"):
            value = 0.2 * rng.normal(size=leaf.shape)
        else:
            value = np.zeros(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _eval(model: ResNet, variables: dict[str, Any], x: jax.Array) -> jax.Array:
    """Eval logits under jit (one compilation is cheaper than many eager ones)."""
    return jax.jit(functools.partial(model.apply, train=False))(variables, x)


def _check(kind: str, dtype: Any, size: tuple[int, int], tol: float, **kw: Any) -> None:
    model = _model(kind, dtype, **kw)
    x = jax.random.normal(jax.random.key(3), (2, *size, 3), dtype)
    variables = _random_variables(model, x, seed=11)
    folded, folded_vars = fold(model, variables)
    want, got = _eval(model, variables, x), _eval(folded, folded_vars, x)
    assert got.dtype == want.dtype == dtype
    assert _rel(got, want) < tol, _rel(got, want)


@pytest.mark.parametrize("kind, size", [("basic", ODD_SIZE), ("bottleneck", (32, 32))])
def test_folded_logits_match_fp32(kind: str, size: tuple[int, int]) -> None:
    _check(kind, jnp.float32, size, 1e-5)


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_folded_logits_match_fp64(kind: str) -> None:
    with jax.enable_x64(True):
        _check(kind, jnp.float64, ODD_SIZE, 1e-10)


def test_fold_takes_the_models_batchnorm_epsilon() -> None:
    """A model whose BatchNorm epsilon is not torch's default folds with its own epsilon."""
    with jax.enable_x64(True):
        _check("basic", jnp.float64, (9, 11), 1e-10, norm=functools.partial(BatchNorm2d, epsilon=0.5))


@pytest.fixture(scope="module")
def folded_case() -> tuple[ResNet, dict[str, Any], ResNet, dict[str, Any], jax.Array]:
    """A BottleNeck net with random statistics, and its folded copy."""
    model = _model("bottleneck", jnp.float32)
    x = jax.random.normal(jax.random.key(0), (2, *ODD_SIZE, 3))
    variables = _random_variables(model, x, seed=5)
    return (model, variables, *fold(model, variables), x)


def test_folded_tree_keeps_paths_and_drops_batchnorm(folded_case: Any) -> None:
    model, variables, folded, folded_vars, x = folded_case
    assert folded.norm is FoldedBatchNorm and set(folded_vars) == {"params"}
    assert is_folded(folded) and not is_folded(model)
    own = jax.eval_shape(folded.init, jax.random.key(0), x)
    assert jax.tree.structure(own) == jax.tree.structure(folded_vars)
    block = folded_vars["params"]["conv2_x"]["0"]
    assert set(block["residual_function"]) == {"0", "3", "6"} and set(block["shortcut"]) == {"0"}
    conv = block["residual_function"]["0"]
    assert set(conv) == {"kernel", "bias"}
    original = variables["params"]["conv2_x"]["0"]["residual_function"]["0"]["kernel"]
    assert not np.allclose(conv["kernel"], original)
    np.testing.assert_array_equal(folded_vars["params"]["fc"]["kernel"], variables["params"]["fc"]["kernel"])


def test_folded_bf16_close_to_fp32(folded_case: Any) -> None:
    model, variables, _, _, x = folded_case
    folded, folded_vars = fold(model.clone(dtype=jnp.bfloat16), variables)
    want, got = _eval(model, variables, x), _eval(folded, folded_vars, x)
    assert got.dtype == jnp.bfloat16
    assert _rel(got, want) < 3e-2


def test_folded_model_is_inference_only(folded_case: Any) -> None:
    _, _, folded, folded_vars, x = folded_case
    with pytest.raises(ValueError, match="inference-only"):
        folded.apply(folded_vars, x, train=True)


def test_fold_rejects_bad_input(folded_case: Any) -> None:
    model, variables, folded, folded_vars, _ = folded_case
    with pytest.raises(ValueError, match="batch_stats"):
        fold(model, {"params": variables["params"]})
    with pytest.raises(TypeError, match="not folded"):
        fold(folded, folded_vars)
    stats = jax.tree.map(lambda a: a, variables["batch_stats"])
    del stats["conv1"]["1"]
    with pytest.raises(ValueError, match="conv1/1"):
        fold(model, {"params": variables["params"], "batch_stats": stats})
