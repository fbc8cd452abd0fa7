"""parity.torch_to_flax / flax_to_torch: exact round trips, equal logits, and errors that name every key."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import traverse_util

import parity
import resnet_flax
import resnet_torch
from parity.arch import ArchSpec
from parity.arrays import numpy_dtype
from parity.convert import LEAF_RULES, check_flax_variables
from parity.names import seed_to_torchvision
from parity.pairs import randomize_batchnorm
from resnet_arch import DEPTHS

EVAL_RTOL_FP32 = 1e-5
ODD_SIZE = (33, 47)  # odd, non-square: symmetric padding and 'SAME' differ here


def _spec(name: str, num_classes: int = 1000, small_stem: bool = False) -> ArchSpec:
    block, num_block = DEPTHS[name]
    return ArchSpec(block, num_block, num_classes, small_stem)


def _random_state_dict(spec: ArchSpec, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random tensors of every seed key (counters random ints), as a trained checkpoint might hold."""
    out = {}
    for key, shape in spec.torch_shapes().items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.randint(0, 10_000, (), dtype=torch.int64)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, dtype=dtype) + 0.5
        else:
            out[key] = torch.randn(shape, dtype=dtype)
    return out


def _randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Random BatchNorm affine parameters and running statistics, so a wrong stat mapping shows."""
    randomize_batchnorm(model, torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))
    return model.eval()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _flax_logits(spec: ArchSpec, variables, x_nchw: torch.Tensor, dtype=jnp.float32) -> np.ndarray:
    """Eager apply: its per-op compilations are shared by every depth (jit compiles each model whole)."""
    model = spec.flax_model(dtype=dtype, param_dtype=dtype)
    return np.asarray(model.apply(variables, jnp.asarray(x_nchw.permute(0, 2, 3, 1).numpy()), train=False))


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# --- the shape rule ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DEPTHS))
@pytest.mark.parametrize("small_stem", [False, True])
def test_shape_rule_matches_the_torch_model(name: str, small_stem: bool) -> None:
    spec = _spec(name, num_classes=7, small_stem=small_stem)
    with torch.device("meta"):
        torch_model = resnet_torch.build(name, num_classes=7, small_stem=small_stem)
    assert [(k, tuple(v.shape)) for k, v in torch_model.state_dict().items()] == list(spec.torch_shapes().items())


@pytest.mark.parametrize("name, small_stem", [("resnet18", True), ("resnet50", False)])
def test_conversion_gives_the_flax_models_tree(name: str, small_stem: bool) -> None:
    model = resnet_flax.build(name, num_classes=7, small_stem=small_stem)
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    expected = {p: (v.shape, v.dtype) for p, v in traverse_util.flatten_dict(tree).items()}
    variables = parity.torch_to_flax(
        _random_state_dict(_spec(name, num_classes=7, small_stem=small_stem)), target=model
    )
    assert {p: (v.shape, v.dtype) for p, v in traverse_util.flatten_dict(variables).items()} == expected


# --- exact round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DEPTHS))
def test_torch_flax_torch_is_bit_identical(name: str) -> None:
    sd = _random_state_dict(_spec(name))
    _assert_same_tensors(parity.flax_to_torch(parity.torch_to_flax(sd)), sd)


@pytest.mark.parametrize("name", list(DEPTHS))
def test_flax_torch_flax_is_bit_identical(name: str) -> None:
    fresh = parity.torch_to_flax(_random_state_dict(_spec(name)))
    back = parity.torch_to_flax(parity.flax_to_torch(fresh))
    flat_a, flat_b = traverse_util.flatten_dict(back), traverse_util.flatten_dict(fresh)
    assert set(flat_a) == set(flat_b)
    for path in flat_b:
        assert flat_a[path].dtype == flat_b[path].dtype, path
        np.testing.assert_array_equal(np.asarray(flat_a[path]), np.asarray(flat_b[path]), err_msg=str(path))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_are_kept(dtype: torch.dtype) -> None:
    sd = _random_state_dict(_spec("resnet18", num_classes=5), dtype)
    with jax.enable_x64(dtype == torch.float64):
        variables = parity.torch_to_flax(sd)
        assert variables["params"]["conv1"]["0"]["kernel"].dtype == numpy_dtype(dtype)
        assert variables["batch_stats"]["conv1"]["1"]["num_batches_tracked"].dtype == jnp.int32
        _assert_same_tensors(parity.flax_to_torch(variables), sd)


def test_dtype_cast_only_when_asked() -> None:
    sd = _random_state_dict(_spec("resnet18", num_classes=5), torch.float64)
    with pytest.raises(parity.ConversionError, match="jax_enable_x64"):
        parity.torch_to_flax(sd)
    variables = parity.torch_to_flax(sd, dtype=torch.float32)
    assert variables["params"]["fc"]["kernel"].dtype == jnp.float32
    back = parity.flax_to_torch(variables, dtype=torch.bfloat16)
    assert back["fc.weight"].dtype == torch.bfloat16
    assert back["conv1.1.num_batches_tracked"].dtype == torch.int64
    torch.testing.assert_close(back["fc.weight"], sd["fc.weight"].to(torch.bfloat16))


def test_result_owns_its_memory() -> None:
    sd = _random_state_dict(_spec("resnet18", num_classes=5))
    variables = parity.torch_to_flax(sd)
    before = np.array(variables["batch_stats"]["conv1"]["1"]["mean"])
    sd["conv1.1.running_mean"].add_(1.0)
    np.testing.assert_array_equal(np.asarray(variables["batch_stats"]["conv1"]["1"]["mean"]), before)


# --- inputs: module, pairs, named_parameters alone, torchvision names ------------------------------


def test_module_and_pairs_give_the_same_tree() -> None:
    model = _randomize_bn(resnet_torch.resnet18(num_classes=5))
    a = parity.torch_to_flax(model)
    b = parity.torch_to_flax([*model.named_parameters(), *model.named_buffers()])
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    assert all(np.array_equal(x, y) for x, y in leaves)


def test_named_parameters_alone_warns_and_takes_fresh_stats() -> None:
    model = _randomize_bn(resnet_torch.resnet18(num_classes=5))
    with pytest.warns(UserWarning, match="running statistics take the fresh defaults"):
        variables = parity.torch_to_flax(model.named_parameters())
    stats = variables["batch_stats"]["conv2_x"]["1"]["residual_function"]["4"]
    np.testing.assert_array_equal(np.asarray(stats["mean"]), 0.0)
    np.testing.assert_array_equal(np.asarray(stats["var"]), 1.0)
    assert int(stats["num_batches_tracked"]) == 0
    np.testing.assert_array_equal(np.asarray(variables["params"]["fc"]["kernel"]), model.fc.weight.detach().numpy().T)


@pytest.mark.parametrize("name", list(DEPTHS))
def test_torchvision_names_round_trip_and_load_strict(name: str) -> None:
    with torch.device("meta"):
        tv_shapes = {k: v.shape for k, v in getattr(torchvision.models, name)(weights=None).state_dict().items()}
    sd = {
        k: torch.randint(0, 99, ()) if k.endswith("num_batches_tracked") else torch.randn(s)
        for k, s in tv_shapes.items()
    }
    variables = parity.torch_to_flax(sd)
    assert parity.arch_of(sd) == _spec(name)
    back = parity.flax_to_torch(variables, layout="torchvision")
    _assert_same_tensors(back, sd)
    with torch.device("meta"):
        fresh, seed_model = getattr(torchvision.models, name)(weights=None), _spec(name).torch_model()
    fresh.load_state_dict(back, strict=True, assign=True)
    seed_model.load_state_dict(parity.flax_to_torch(variables), strict=True, assign=True)


# --- equal logits -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, size",
    [(n, ODD_SIZE) for n in DEPTHS] + [("resnet18", (224, 224)), ("resnet50", (224, 224))],
)
def test_eval_logits_match_after_conversion(name: str, size: tuple[int, int]) -> None:
    model = _randomize_bn(resnet_torch.build(name, num_classes=1000))
    x = torch.randn(1 if size == (224, 224) else 2, 3, *size)
    with torch.no_grad():
        expected = model(x).numpy()
    got = _flax_logits(_spec(name), parity.torch_to_flax(model.state_dict()), x)
    assert _rel(got, expected) < EVAL_RTOL_FP32


@pytest.mark.parametrize("name, size", [(n, ODD_SIZE) for n in DEPTHS])
def test_torchvision_logits_match_after_conversion(name: str, size: tuple[int, int]) -> None:
    tv = _randomize_bn(getattr(torchvision.models, name)(weights=None))
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = tv(x).numpy()
    got = _flax_logits(_spec(name), parity.torch_to_flax(tv), x)
    assert _rel(got, expected) < EVAL_RTOL_FP32


# --- errors that name every key -------------------------------------------------------------------


def _listed(message: str, title: str) -> set[str]:
    m = re.search(rf"^  {re.escape(title)} \(\d+\): (.*)$", message, re.M)
    return set(m[1].split(", ")) if m else set()


def test_deeper_checkpoint_for_shallower_target_names_every_extra_key() -> None:
    sd = _random_state_dict(_spec("resnet34", num_classes=10))
    with pytest.raises(parity.ConversionError) as e:
        parity.torch_to_flax(sd, target=resnet_flax.resnet18())
    extra = set(sd) - set(_spec("resnet18", num_classes=10).torch_shapes())
    assert extra and _listed(str(e.value), "unexpected") == extra
    assert "resnet18" in str(e.value)


def test_class_count_mismatch_names_both_fc_tensors() -> None:
    sd = _random_state_dict(_spec("resnet18", num_classes=10))
    with pytest.raises(parity.ConversionError) as e:
        parity.torch_to_flax(sd, target=resnet_flax.resnet18(num_classes=1000))
    assert "fc.weight: got (10, 512), expected (1000, 512)" in str(e.value)
    assert "fc.bias: got (10,), expected (1000,)" in str(e.value)


def test_missing_running_var_is_named_in_the_callers_layout() -> None:
    sd = torchvision.models.resnet18(weights=None).state_dict()
    del sd["layer2.1.bn2.running_var"], sd["bn1.running_var"]
    with pytest.raises(parity.ConversionError) as e:
        parity.torch_to_flax(sd)
    assert _listed(str(e.value), "missing") == {"layer2.1.bn2.running_var", "bn1.running_var"}


def test_flax_side_errors_name_every_leaf() -> None:
    variables = parity.torch_to_flax(_random_state_dict(_spec("resnet50", num_classes=3)))
    flat = traverse_util.flatten_dict(variables)
    del flat[("batch_stats", "conv3_x", "0", "shortcut", "1", "var")]
    flat[("params", "fc", "kernel")] = jnp.zeros((2047, 3))
    flat[("params", "extra", "kernel")] = jnp.zeros((3, 3))
    broken = traverse_util.unflatten_dict(flat)
    for convert in (parity.flax_to_torch, check_flax_variables):
        with pytest.raises(parity.ConversionError) as e:
            convert(broken)
        message = str(e.value)
        assert _listed(message, "missing") == {"batch_stats/conv3_x/0/shortcut/1/var"}
        assert "shape mismatch (1): params/fc/kernel: got (2047, 3), expected (2048, 3)" in message
        assert _listed(message, "unexpected") == {"params/extra/kernel"}


def test_not_a_resnet_is_a_conversion_error() -> None:
    with pytest.raises(parity.ConversionError, match="conv1.0.weight"):
        parity.torch_to_flax({"fc.weight": torch.randn(3, 4), "fc.bias": torch.randn(3)})
    with pytest.raises(parity.ConversionError, match="'params'"):
        parity.flax_to_torch({"weights": {}})
    with pytest.raises(TypeError, match="resnet_flax.ResNet"):
        parity.torch_to_flax(_random_state_dict(_spec("resnet18")), target=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="layout"):
        parity.flax_to_torch({"params": {}}, layout="timm")


def test_leaf_rules_are_inverse_pairs() -> None:
    for rule in LEAF_RULES:
        if rule.perm is not None:
            assert tuple(np.asarray(rule.perm)[list(rule.inverse_perm())]) == tuple(range(rule.ndim))
    assert seed_to_torchvision("conv5_x.2.residual_function.7.running_var") == "layer4.2.bn3.running_var"
