"""The fused train-mode BatchNorm: the same function and gradient as JAX's derivative of the
two-pass one, the same variables, and parity with torch when it is the Flax side of a check."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import resnet_flax
from parity.checks.compare import FLOOR_FACTOR
from parity.checks.precision import CHECKS, CPU, EVAL, FP32, FP64, GRADIENTS, RUNNING_STATS, TRAIN_LOGITS
from parity.checks.run import run_checks
from resnet_flax.fold import fold
from resnet_flax.fused import fused, fused_batch_norm2d, fused_batch_norm_train, is_fused
from resnet_flax.ops import TORCH_BN_EPS, batch_norm_train


def _weighted_loss(
    norm: Callable[..., tuple[jax.Array, ...]], w_out: jax.Array, w_mean: jax.Array, w_var: jax.Array
) -> Callable[..., jax.Array]:
    """A loss that uses the output and both returned statistics, so every cotangent is nonzero."""

    def loss(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
        y, mean, var = norm(x, scale, bias, TORCH_BN_EPS)
        return jnp.sum(w_out * y) + jnp.sum(w_mean * mean) + jnp.sum(w_var * var)

    return loss


@pytest.mark.parametrize("shape", [(4, 5, 7, 6), (3, 11, 2)])
def test_fused_gradients_equal_autodiff_fp64(shape: tuple[int, ...]) -> None:
    with jax.enable_x64(True):
        k = jax.random.split(jax.random.key(0), 6)
        c = shape[-1]
        x = jax.random.normal(k[0], shape, jnp.float64) * 3 + 2
        scale, bias = jax.random.normal(k[1], (c,), jnp.float64), jax.random.normal(k[2], (c,), jnp.float64)
        weights = (
            jax.random.normal(k[3], shape, jnp.float64),
            jax.random.normal(k[4], (c,), jnp.float64),
            jax.random.normal(k[5], (c,), jnp.float64),
        )
        want_out = batch_norm_train(x, scale, bias, TORCH_BN_EPS)
        got_out = fused_batch_norm_train(x, scale, bias, TORCH_BN_EPS)
        want = jax.grad(_weighted_loss(batch_norm_train, *weights), (0, 1, 2))(x, scale, bias)
        got = jax.grad(_weighted_loss(fused_batch_norm_train, *weights), (0, 1, 2))(x, scale, bias)
    for a, b in zip((*want_out, *want), (*got_out, *got), strict=True):
        assert a.dtype == b.dtype == jnp.float64
        np.testing.assert_allclose(b, a, rtol=1e-11, atol=1e-12)


def test_one_pass_variance_keeps_precision_far_from_zero() -> None:
    """Activations with mean 1e4 and std 1 in float32: a plain E[x^2] - E[x]^2 loses every digit."""
    x = 1e4 + jax.random.normal(jax.random.key(1), (16, 9, 9, 8), jnp.float32)
    ones, zeros = jnp.ones(8, jnp.float32), jnp.zeros(8, jnp.float32)
    _, _, var = fused_batch_norm_train(x, ones, zeros, TORCH_BN_EPS)
    exact = np.var(np.asarray(x, np.float64), axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(var), exact, rtol=1e-4)


def test_bf16_input_keeps_float32_statistics_and_bf16_gradient() -> None:
    x = jax.random.normal(jax.random.key(2), (4, 6, 6, 5), jnp.bfloat16)
    scale, bias = jnp.full(5, 1.5, jnp.float32), jnp.full(5, 0.25, jnp.float32)
    y, mean, var = fused_batch_norm_train(x, scale, bias, TORCH_BN_EPS)
    assert (y.dtype, mean.dtype, var.dtype) == (jnp.float32,) * 3
    dx = jax.grad(lambda x: jnp.sum(fused_batch_norm_train(x, scale, bias, TORCH_BN_EPS)[0] ** 2))(x)
    ref = jax.grad(lambda x: jnp.sum(batch_norm_train(x, scale, bias, TORCH_BN_EPS)[0] ** 2))(x)
    assert dx.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(ref, np.float32), rtol=3e-2, atol=3e-2)


def test_fused_model_keeps_options_variables_and_folds() -> None:
    # Bottleneck blocks, one per stage: every layer kind, the depth is not the point.
    options = dict(num_classes=7, small_stem=True, zero_init_residual=True, dtype=jnp.bfloat16)
    model = resnet_flax.ResNet(resnet_flax.BottleNeck, (1, 1, 1, 1), **options)
    fast = fused(model)
    assert fast.norm is fused_batch_norm2d and fused(fast) == fast
    assert is_fused(fast) and not is_fused(model)
    assert (fast.num_classes, fast.small_stem, fast.zero_init_residual, fast.dtype) == (7, True, True, jnp.bfloat16)
    x = jnp.zeros((1, 16, 16, 3))
    assert jax.tree.structure(jax.eval_shape(fast.init, jax.random.key(0), x)) == jax.tree.structure(
        jax.eval_shape(model.init, jax.random.key(0), x)
    )
    variables = jax.jit(model.init)(jax.random.key(0), x)
    np.testing.assert_array_equal(jax.jit(fast.apply)(variables, x), jax.jit(model.apply)(variables, x))
    assert fold(fast, variables)[0].num_classes == 7
    with pytest.raises(TypeError, match="expects a resnet_flax.ResNet whose BatchNorms are not folded"):
        fused(fold(model, variables)[0])


def _flat_gradients(model: resnet_flax.ResNet, variables: dict, x: jax.Array, y: jax.Array) -> np.ndarray:
    def loss(params: Any) -> jax.Array:
        variables_in = {"params": params, "batch_stats": variables["batch_stats"]}
        logits, _ = model.apply(variables_in, x, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    # Jitted, as training runs it (and one program is far quicker than the op-by-op dispatch of a ResNet).
    return np.concatenate(
        [np.asarray(g, np.float64).ravel() for g in jax.tree.leaves(jax.jit(jax.grad(loss))(variables["params"]))]
    )


def test_fused_float32_gradients_are_no_less_accurate() -> None:
    """Against float64, in a net whose last stages normalise over few values (batch 8, 4x4 maps): the
    closed form's float32 gradients are as accurate as JAX's derivative of the two-pass BatchNorm, up
    to the factor of two that two float32 computations of the same function can differ by."""
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((8, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, 8)
    model = resnet_flax.resnet18(num_classes=10, small_stem=True)
    variables = model.init(jax.random.key(0), x)
    plain, fast = _flat_gradients(model, variables, x, y), _flat_gradients(fused(model), variables, x, y)
    with jax.enable_x64(True):
        model64 = model.clone(dtype=jnp.float64, param_dtype=jnp.float64)
        variables64 = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, variables)
        exact = _flat_gradients(model64, variables64, x.astype(np.float64), y)
    err = {name: np.linalg.norm(g - exact) / np.linalg.norm(exact) for name, g in (("plain", plain), ("fused", fast))}
    assert err["fused"] < 1e-5 and err["fused"] <= FLOOR_FACTOR * err["plain"], err


@pytest.mark.parametrize(
    "arch, precision, size, wanted",
    [
        ("resnet18", FP64, (33, 47), CHECKS),
        ("resnet50", FP64, (33, 47), (EVAL, TRAIN_LOGITS, RUNNING_STATS, GRADIENTS)),
        ("resnet18", FP32, (47, 33), CHECKS),
        ("resnet50", FP32, (35, 29), (TRAIN_LOGITS, RUNNING_STATS)),
    ],
)
def test_fused_parity_with_torch(arch: str, precision: str, size: tuple[int, int], wanted: tuple[str, ...]) -> None:
    results = run_checks(arch, CPU, precision, size, 2, seed=1, checks=wanted, fused_bn=True)
    assert [r.check for r in results] == [c for c in CHECKS if c in wanted]
    for r in results:
        assert r.passed, (
            f"{arch} {precision} {r.check}: rel {r.rel:.3e} > {r.tol:.0e}, first diverging {r.first_diverging}"
        )
