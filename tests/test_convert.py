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
import parity.conversion.nnx
import parity.conversion.validate
import resnet_flax
import resnet_torch
from parity.checks.pairs import randomize_batchnorm
from parity.conversion.arch import ArchSpec
from parity.conversion.arrays import numpy_dtype
from parity.conversion.convert import check_flax_variables
from parity.conversion.names import from_seed
from parity.conversion.rules import LEAF_RULES
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
    variables = parity.torch_to_flax(sd, param_dtype=torch.float32)
    assert variables["params"]["fc"]["kernel"].dtype == jnp.float32
    back = parity.flax_to_torch(variables, param_dtype=torch.bfloat16)
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


# Logits of torchvision's, timm's and transformers' models: tests/test_hub.py.


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
        parity.flax_to_torch({"params": {}}, layout="keras")


def test_leaf_rules_are_inverse_pairs() -> None:
    for rule in LEAF_RULES:
        if rule.perm is not None:
            assert tuple(np.asarray(rule.perm)[list(rule.inverse_perm())]) == tuple(range(rule.ndim))
    assert from_seed("conv5_x.2.residual_function.7.running_var", "torchvision") == "layer4.2.bn3.running_var"


# --- bad input: mixed layouts, wrappers, dtypes and values -----------------------------------------


def test_one_torchvision_key_among_seed_keys_is_refused() -> None:
    sd = _random_state_dict(_spec("resnet18", num_classes=5))
    mixed = {**sd, "layer1.0.conv1.weight": torch.randn(64, 64, 3, 3)}  # would overwrite conv2_x.0's first conv
    with pytest.raises(parity.ConversionError, match=r"mixed layouts.*'layer1.0.conv1.weight', torchvision"):
        parity.torch_to_flax(mixed)
    tv = parity.flax_to_torch(parity.torch_to_flax(sd), "torchvision")
    with pytest.raises(parity.ConversionError, match=r"mixed layouts.*conv2_x.0.residual_function.0.weight"):
        parity.torch_to_flax({**tv, "conv2_x.0.residual_function.0.weight": torch.randn(64, 64, 3, 3)})


def test_wrapper_prefixes_are_stripped_with_a_warning() -> None:
    model = _randomize_bn(resnet_torch.resnet18(num_classes=5))
    expected = parity.torch_to_flax(model)
    compiled = torch.compile(model)  # its state_dict() puts '_orig_mod.' before every key; nothing is compiled
    wrapped = {f"module.{k}": v for k, v in compiled.state_dict().items()}
    with pytest.warns(UserWarning) as record:
        got = parity.torch_to_flax(wrapped)
    assert [str(w.message) for w in record] == [
        "stripped 'module.' (DataParallel/DistributedDataParallel) from every key",
        "stripped '_orig_mod.' (torch.compile) from every key",
    ]
    assert record[0].filename == __file__  # the warning points at the caller's line
    leaves = zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected), strict=True)
    assert all(np.array_equal(a, b) for a, b in leaves)


def test_checkpoint_nested_under_model_state_is_found(tmp_path) -> None:
    sd = _random_state_dict(_spec("resnet18", num_classes=5))
    torch.save({"model_state": sd, "epoch": 7, "optimizer": {"lr": torch.tensor(0.1)}}, tmp_path / "ckpt.pth")
    _, variables = parity.load_checkpoint(tmp_path / "ckpt.pth", "linen")
    np.testing.assert_array_equal(np.asarray(variables["params"]["fc"]["bias"]), sd["fc.bias"].numpy())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weights_are_refused_or_warned(value: float) -> None:
    sd = _random_state_dict(_spec("resnet18", num_classes=5))
    sd["conv3_x.1.residual_function.3.weight"][0, 0, 0, 0] = value
    kind = "1 NaN, 0 inf" if value != value else "0 NaN, 1 inf"
    with pytest.raises(
        parity.ConversionError, match=rf"NaN/inf \(1\): conv3_x.1.residual_function.3.weight \({kind}\)"
    ):
        parity.torch_to_flax(sd)
    with pytest.warns(UserWarning, match="converting values no trained network has: NaN/inf"):
        variables = parity.torch_to_flax(sd, bad_values="warn")
    kernel = np.asarray(variables["params"]["conv3_x"]["1"]["residual_function"]["3"]["kernel"])
    np.testing.assert_array_equal(kernel[0, 0, 0, 0], value)
    with pytest.raises(parity.ConversionError, match=r"params/conv3_x/1/residual_function/3/kernel \("):
        parity.flax_to_torch(variables)
    with pytest.raises(ValueError, match="bad_values must be one of error, warn"):
        parity.torch_to_flax(sd, bad_values="ignore")


@pytest.mark.parametrize("counter, kept", [(torch.tensor(2.5), 2), (torch.tensor(-3), -3)])
def test_fractional_or_negative_counter_is_refused_or_warned(counter: torch.Tensor, kept: int) -> None:
    sd = _random_state_dict(_spec("resnet18", num_classes=5))
    sd["conv1.1.num_batches_tracked"] = counter
    with pytest.raises(parity.ConversionError, match=r"negative or fractional counter \(1\): conv1.1.num_batches"):
        parity.torch_to_flax(sd)
    with pytest.warns(UserWarning, match="negative or fractional counter: conv1.1.num_batches_tracked"):
        variables = parity.torch_to_flax(sd, bad_values="warn")
    assert int(variables["batch_stats"]["conv1"]["1"]["num_batches_tracked"]) == kept


@pytest.mark.parametrize("counter", [torch.tensor(2**40), torch.tensor(-(2**31) - 1), torch.tensor(float("nan"))])
def test_counter_that_int32_cannot_hold_is_an_error_even_when_warning(counter: torch.Tensor) -> None:
    sd = _random_state_dict(_spec("resnet18", num_classes=5))
    sd["conv4_x.0.shortcut.1.num_batches_tracked"] = counter
    for bad_values in ("error", "warn"):
        with pytest.raises(
            parity.ConversionError, match=r"(?s)cannot be stored .*conv4_x.0.shortcut.1.num_batches_tracked"
        ):
            parity.torch_to_flax(sd, bad_values=bad_values)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.complex64, torch.float8_e4m3fn, "int8", jnp.int8])
def test_casts_to_anything_but_a_float_weight_dtype_are_refused(dtype) -> None:
    sd = _random_state_dict(_spec("resnet18", num_classes=5))
    with pytest.raises(ValueError, match="param_dtype casts floating-point weights: one of float16, bfloat16"):
        parity.torch_to_flax(sd, param_dtype=dtype)
    with pytest.raises(ValueError, match="dtype casts floating-point weights"):
        parity.flax_to_torch(parity.torch_to_flax(sd), param_dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float8_e4m3fn, torch.int8])
def test_tensors_of_a_dtype_no_weight_has_are_named(dtype: torch.dtype) -> None:
    sd = _random_state_dict(_spec("resnet18", num_classes=5))
    sd["fc.weight"] = sd["fc.weight"].to(dtype)
    with pytest.raises(parity.ConversionError, match=rf"dtype \(1\): fc.weight: {str(dtype)[6:]}$"):
        parity.torch_to_flax(sd)


def test_meta_tensors_are_named() -> None:
    with torch.device("meta"):
        model = resnet_torch.resnet18(num_classes=5)
    with pytest.raises(parity.ConversionError, match=r"without plain data .*\n  tensor \(\d+\): conv1.0.weight"):
        parity.torch_to_flax(model)


# --- each direction is checked once --------------------------------------------------------------


def _count_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each whole-tree check the converters make (by the title of what it compares against)."""
    calls: list[str] = []
    real = parity.conversion.validate.check_names_and_shapes

    def counted(got, expected, what, *args):
        calls.append(what)
        return real(got, expected, what, *args)

    for module in (parity.conversion.convert, parity.conversion.nnx):  # every module that checks a tree
        monkeypatch.setattr(module, "check_names_and_shapes", counted)
    return calls


@pytest.mark.parametrize("source", ["torch.safetensors", "linen.msgpack"])
@pytest.mark.parametrize("framework", ["torch", "linen", "nnx"])
def test_loading_checks_the_weights_once(tmp_path, monkeypatch, source: str, framework: str) -> None:
    sd = _random_state_dict(_spec("resnet18", num_classes=5))
    kind, suffix = source.split(".")
    path = tmp_path / f"w.{suffix}"
    parity.write_checkpoint(path, sd if kind == "torch" else parity.torch_to_flax(sd), kind)
    calls = _count_checks(monkeypatch)
    parity.load_checkpoint(path, framework)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "source, output, to",
    [
        ("a.pth", "b.safetensors", []),
        ("a.msgpack", "b.pth", []),
        ("a.msgpack", "b.msgpack", []),
        ("a.pth", "b.msgpack", ["--to", "nnx"]),
        ("a.msgpack", "b.safetensors", ["--to", "nnx"]),
    ],
)
def test_cli_checks_once_and_casts_without_a_round_trip(
    tmp_path, monkeypatch, source: str, output: str, to: list[str]
) -> None:
    from parity.cli import main

    sd = _random_state_dict(_spec("resnet18", num_classes=5))
    kind = "torch" if source.endswith(".pth") else "linen"
    parity.write_checkpoint(tmp_path / source, sd if kind == "torch" else parity.torch_to_flax(sd), kind)
    calls = _count_checks(monkeypatch)
    assert main(["convert", str(tmp_path / source), str(tmp_path / output), "--param-dtype", "bf16", *to]) == 0
    assert len(calls) == 1
    out = parity.read_checkpoint(tmp_path / output).tensors
    fc = (
        out["fc.weight"].float().numpy()
        if "fc.weight" in out
        else np.asarray(out["params"]["fc"]["kernel"], np.float32).T
    )
    np.testing.assert_array_equal(fc, sd["fc.weight"].to(torch.bfloat16).float().numpy())
