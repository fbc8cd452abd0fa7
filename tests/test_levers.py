"""The speed levers compute the plain model's function: logits, gradients and running statistics to 1e-10
in float64 (linen and NNX), each lever alone and all together; the lever arithmetic at odd sizes and on ties;
the fused BatchNorm's two-pass variance more accurate than one pass in float32."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

import resnet_flax
from resnet_flax import levers
from resnet_flax import nnx as flax_nnx
from resnet_flax.fused import (
    fused,
    fused_batch_norm2d_two_pass,
    fused_batch_norm_train,
    fused_batch_norm_train_two_pass,
)
from resnet_flax.model import BasicBlock, ResNet
from resnet_flax.ops import TORCH_BN_EPS, batch_norm_train, conv2d, max_pool2d

TOL = 1e-10
# A tiny ResNet with every layer a lever touches: the ImageNet stem (7x7/2 and max-pool) and strided 1x1
# shortcuts (BasicBlock; the stride-1 1x1 of BottleNeck is checked below), at 32x32, batch 2, 5 classes.
NUM_BLOCK = (1, 1, 1, 1)
SHAPE = (2, 32, 32, 3)
CLASSES = 5
# Every lever off: 1x1 convolutions as XLA convolutions too (the CPU's default is a matrix product).
PLAIN: dict[str, Any] = {"matmul_1x1": False}
LEVERS: dict[str, dict[str, Any]] = {
    "max_pool_argmax_grad": {"max_pool_argmax_grad": True},
    "space_to_depth_stem": {"space_to_depth_stem": True},
    "matmul_1x1": {"matmul_1x1": True},
    "bn_two_pass": {"two_pass": True},
    "all": {"max_pool_argmax_grad": True, "space_to_depth_stem": True, "matmul_1x1": True, "two_pass": True},
}


def rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _tree_rel(a: Any, b: Any) -> float:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return max(rel(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _linen_model(two_pass: bool = False, **options: Any) -> ResNet:
    """The fused model (the trainer's), every lever off unless ``options`` turn one on."""
    model = ResNet(BasicBlock, NUM_BLOCK, num_classes=CLASSES, dtype=jnp.float64, param_dtype=jnp.float64)
    return fused(model.clone(**{**PLAIN, **options}), two_pass=two_pass)


def _linen_step(model: ResNet, variables: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any, Any]:
    """Train-mode logits, the gradients of a loss of them, and the new running statistics."""

    def loss(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
        logits, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(jax.nn.log_softmax(logits) * y), (logits, updates["batch_stats"])

    (_, (logits, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    return logits, grads, stats


@pytest.fixture(scope="module")
def linen_plain() -> tuple[Any, ...]:
    """The plain model's variables, a batch with random targets, and its logits, gradients and statistics."""
    with jax.enable_x64(True):
        kx, ky = jax.random.split(jax.random.key(1))
        x = jax.random.normal(kx, SHAPE, jnp.float64) * 2 + 0.5
        y = jax.random.normal(ky, (SHAPE[0], CLASSES), jnp.float64)
        model = _linen_model()
        variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))
        return variables, x, y, _linen_step(model, variables, x, y)


@pytest.mark.parametrize("lever", sorted(LEVERS))
def test_linen_lever_is_the_same_function_fp64(lever: str, linen_plain: tuple[Any, ...]) -> None:
    variables, x, y, (logits, grads, stats) = linen_plain
    with jax.enable_x64(True):
        model = _linen_model(**LEVERS[lever])
        shapes = jax.eval_shape(lambda k: model.init(k, x, train=False), jax.random.key(0))
        assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, variables)
        got_logits, got_grads, got_stats = _linen_step(model, variables, x, y)
    assert rel(got_logits, logits) < TOL
    assert _tree_rel(got_grads, grads) < TOL
    assert _tree_rel(got_stats, stats) < TOL
    assert _tree_rel(grads, jax.tree.map(jnp.zeros_like, grads)) > 0.1  # the gradients are not all zero


def _nnx_step(model: flax_nnx.ResNet, x: jax.Array, y: jax.Array) -> tuple[Any, Any, Any]:
    """As ``_linen_step`` for an NNX model (split outside jit, merged inside, as the trainer does)."""
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    @jax.jit
    def step(params: Any, stats: Any) -> tuple[Any, Any, Any]:
        m = nnx.merge(graphdef, params, stats)

        def loss(m: flax_nnx.ResNet) -> tuple[jax.Array, jax.Array]:
            logits = m(x)
            return jnp.sum(jax.nn.log_softmax(logits) * y), logits

        (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(m)
        return logits, nnx.to_pure_dict(grads), nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))

    return step(params, stats)


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    """Leaves by path, keys as strings (NNX's pure dicts and linen's trees name Sequential children alike)."""
    return {tuple(map(str, k)): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def test_nnx_levers_are_the_same_function_fp64(linen_plain: tuple[Any, ...]) -> None:
    """NNX takes the same options by the same names: every lever on, from the linen variables, against the
    plain linen model (the two APIs compute the same function: tests/test_nnx.py)."""
    variables, x, y, (logits, grads, stats) = linen_plain
    options = {k: v for k, v in LEVERS["all"].items() if k != "two_pass"}
    with jax.enable_x64(True):
        model = nnx.eval_shape(  # shapes only: the linen variables fill it
            lambda: flax_nnx.ResNet(
                flax_nnx.BasicBlock,
                NUM_BLOCK,
                num_classes=CLASSES,
                dtype=jnp.float64,
                param_dtype=jnp.float64,
                rngs=nnx.Rngs(0),
                **options,
            )
        )
        flat = traverse_util.flatten_dict(dict(variables))
        nnx.update(model, traverse_util.unflatten_dict({path[1:]: v for path, v in flat.items()}))
        got_logits, got_grads, got_stats = _nnx_step(flax_nnx.fused(model, two_pass=True), x, y)
    assert rel(got_logits, logits) < TOL
    want_grads, want_stats = _flat(grads), _flat(stats)
    assert _flat(got_grads).keys() == want_grads.keys()
    assert max(rel(v, want_grads[k]) for k, v in _flat(got_grads).items()) < TOL
    assert _flat(got_stats).keys() == want_stats.keys()
    assert max(rel(v, want_stats[k]) for k, v in _flat(got_stats).items()) < TOL


def test_lever_options_match_between_linen_and_nnx() -> None:
    """Each model lever is a keyword of both APIs with the same default (off)."""
    import inspect

    nnx_params = inspect.signature(flax_nnx.ResNet.__init__).parameters
    linen_fields = {f.name: f.default for f in ResNet.__dataclass_fields__.values()}
    for name in ("matmul_1x1", "space_to_depth_stem", "max_pool_argmax_grad"):
        assert nnx_params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert nnx_params[name].default == linen_fields[name] and linen_fields[name] in (None, False)
    assert resnet_flax.build("resnet18").max_pool_argmax_grad is False


@pytest.mark.parametrize("hw, k, stride, padding", [((16, 16), 7, 2, 3), ((17, 13), 7, 2, 3), ((9, 10), 5, 3, 2)])
def test_space_to_depth_convolution_fp64(hw: tuple[int, int], k: int, stride: int, padding: int) -> None:
    with jax.enable_x64(True):
        kx, kk = jax.random.split(jax.random.key(2))
        x = jax.random.normal(kx, (2, *hw, 3), jnp.float64)
        kernel = jax.random.normal(kk, (k, k, 3, 4), jnp.float64)
        want = conv2d(x, kernel, None, stride, padding, None)
        got = conv2d(x, kernel, None, stride, padding, None, space_to_depth=True)
        assert got.shape == want.shape
        assert rel(got, want) < TOL
        dk = jax.grad(lambda k_, sd: jnp.sum(conv2d(x, k_, None, stride, padding, None, space_to_depth=sd) ** 2))
        assert rel(dk(kernel, True), dk(kernel, False)) < TOL


def test_max_pool_gradient_goes_to_the_first_maximum_on_ties() -> None:
    """Inputs drawn from {0, 1, 2} (most windows tie) and a constant input (every window ties): the
    argmax backward equals JAX's derivative of the plain max-pool, which picks the first maximum."""
    x = jnp.asarray(np.random.default_rng(0).integers(0, 3, (2, 17, 13, 4)), jnp.float32)
    out_shape = max_pool2d(x, 3, 2, 1).shape
    weights = jnp.arange(1.0, 1.0 + np.prod(out_shape)).reshape(out_shape)
    for inputs in (x, jnp.ones_like(x)):
        grads = [
            jax.grad(lambda v, pool=pool: jnp.sum(pool(v, 3, 2, 1) * weights))(inputs)
            for pool in (max_pool2d, levers.max_pool2d_argmax_grad)
        ]
        np.testing.assert_array_equal(levers.max_pool2d_argmax_grad(inputs, 3, 2, 1), max_pool2d(inputs, 3, 2, 1))
        np.testing.assert_array_equal(grads[1], grads[0])
    # On a constant input each window's first position (its top-left) takes the whole cotangent.
    assert float(grads[1][0, 0, 0, 0]) == float(weights[0, 0, 0, 0])


def test_matmul_1x1_strided_fp64() -> None:
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(3), (2, 9, 7, 6), jnp.float64)
        kernel = jax.random.normal(jax.random.key(4), (1, 1, 6, 5), jnp.float64)
        for stride in (1, 2):
            want = conv2d(x, kernel, None, stride, 0, None, matmul_1x1=False)
            assert rel(conv2d(x, kernel, None, stride, 0, None, matmul_1x1=True), want) < TOL


def test_two_pass_variance_more_accurate_in_float32() -> None:
    """Data far from zero (mean 300, std 0.01 per channel) whose first pixel, one pass's shift, lies 100
    standard deviations off: the two-pass variance is closer to float64's variance of the same float32 input."""
    rng = np.random.default_rng(4)
    x32 = (300.0 + 0.01 * rng.standard_normal((8, 9, 9, 4))).astype(np.float32)
    x32[0, 0, 0] = 301.0
    want = np.var(x32.astype(np.float64), axis=(0, 1, 2))
    ones, zeros = jnp.ones(4, jnp.float32), jnp.zeros(4, jnp.float32)
    errors = {}
    for norm in (fused_batch_norm_train, fused_batch_norm_train_two_pass):
        _, _, var = norm(jnp.asarray(x32), ones, zeros, TORCH_BN_EPS)
        errors[norm.__name__] = rel(var, want)
    assert errors["fused_batch_norm_train_two_pass"] < errors["fused_batch_norm_train"] / 10, errors
    with jax.enable_x64(True):
        x, s, b = jnp.asarray(x32, jnp.float64), jnp.ones(4, jnp.float64), jnp.zeros(4, jnp.float64)
        for got, want_ in zip(
            fused_batch_norm_train_two_pass(x, s, b, TORCH_BN_EPS), batch_norm_train(x, s, b, TORCH_BN_EPS), strict=True
        ):
            assert rel(got, want_) < TOL


def test_trainer_options_reach_the_model() -> None:
    from resnet_train.config import TrainConfig, parse_args
    from resnet_train.steps import build_model

    flags = ["--space-to-depth-stem", "--max-pool-argmax-grad", "--matmul-1x1", "--bn-two-pass", "--no-small-stem"]
    model = build_model(parse_args(flags), 10)
    assert (model.space_to_depth_stem, model.max_pool_argmax_grad, model.matmul_1x1) == (True, True, True)
    assert model.norm is fused_batch_norm2d_two_pass
    plain = build_model(TrainConfig(), 10)
    assert (plain.space_to_depth_stem, plain.max_pool_argmax_grad, plain.matmul_1x1) == (False, False, None)
    with pytest.raises(ValueError, match="bn_two_pass is an option of the fused BatchNorm"):
        TrainConfig(bn_two_pass=True, fused_bn=False)
