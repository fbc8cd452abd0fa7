"""Both models against each other and the paper: shapes, counts, init, BatchNorm, bad input, summary.

resnet_torch against the seed tutorial's own keys, init and outputs: tests/test_seed.py."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import resnet_flax
import resnet_torch
from parity.cli import main
from resnet_arch import DEPTHS, HEAD, STAGE_OUTPUTS, STAGES, STEM
from resnet_flax import nnx as flax_nnx
from resnet_flax.layers import BatchNorm2d

# torchvision's parameter counts at num_classes=1000 (torchvision.models.resnetXX().parameters()).
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}
EXPANSION = {"BasicBlock": 1, "BottleNeck": 4}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _down(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution or pooling window (torch's floor rule)."""
    return (size + 2 * padding - kernel) // stride + 1


def expected_nchw(arch: str, small_stem: bool, n: int, h: int, w: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Each stage's output shape worked out from the paper's layer settings, NCHW."""
    if small_stem:
        shapes = {STEM: (n, 64, h, w)}
    else:
        h, w = _down(h, 7, 2, 3), _down(w, 7, 2, 3)
        h, w = _down(h, 3, 2, 1), _down(w, 3, 2, 1)
        shapes = {STEM: (n, 64, h, w)}
    expansion = EXPANSION[DEPTHS[arch][0]]
    for name, width, stride in STAGES:
        h, w = _down(h, 3, stride, 1), _down(w, 3, stride, 1)
        shapes[name] = (n, width * expansion, h, w)
    shapes[HEAD] = (n, num_classes)
    return shapes


def nhwc(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0], *shape[2:], shape[1]) if len(shape) == 4 else shape


@functools.cache
def flax_trace(arch: str, small_stem: bool, hw: tuple[int, int], num_classes: int) -> tuple[dict, int]:
    """(stage output shapes, params count) of a Flax model, traced with eval_shape (no compute)."""
    model = resnet_flax.build(arch, num_classes=num_classes, small_stem=small_stem)
    outputs, variables = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, train=False, return_stages=True),
        jax.ShapeDtypeStruct((2, *hw, 3), jnp.float32),
    )
    count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables["params"]))
    return {k: tuple(v.shape) for k, v in outputs.items()}, count


def meta_torch(arch: str, **kwargs) -> torch.nn.Module:
    """A resnet_torch model on the meta device: shapes only, nothing allocated."""
    with torch.device("meta"):
        return resnet_torch.build(arch, **kwargs)


# ---------------------------------------------------------------- shapes and parameter counts


@pytest.mark.parametrize("small_stem", [False, True], ids=["imagenet-stem", "small-stem"])
@pytest.mark.parametrize("arch", list(DEPTHS))
def test_stage_shapes_both_frameworks(arch: str, small_stem: bool) -> None:
    hw = (33, 47) if small_stem else (97, 131)
    expected = expected_nchw(arch, small_stem, 2, *hw, num_classes=1000)

    model = meta_torch(arch, num_classes=1000, small_stem=small_stem)
    torch_out = model.forward_stages(torch.empty(2, 3, *hw, device="meta"))
    assert list(torch_out) == list(STAGE_OUTPUTS)
    assert {k: tuple(v.shape) for k, v in torch_out.items()} == expected
    assert tuple(model(torch.empty(2, 3, *hw, device="meta")).shape) == (2, 1000)

    flax_out, _ = flax_trace(arch, small_stem, hw, 1000)
    assert list(flax_out) == list(STAGE_OUTPUTS)
    assert flax_out == {k: nhwc(v) for k, v in expected.items()}


@pytest.mark.parametrize("arch", list(DEPTHS))
def test_parameter_counts_match_torchvision(arch: str) -> None:
    torch_count = sum(p.numel() for p in meta_torch(arch, num_classes=1000).parameters())
    _, flax_count = flax_trace(arch, False, (97, 131), 1000)
    assert torch_count == TORCHVISION_PARAMS[arch]
    assert flax_count == TORCHVISION_PARAMS[arch]


def test_small_stem_changes_only_the_stem_kernel() -> None:
    full = sum(p.numel() for p in meta_torch("resnet18", num_classes=1000).parameters())
    small = sum(p.numel() for p in meta_torch("resnet18", num_classes=1000, small_stem=True).parameters())
    assert full - small == 64 * 3 * (7 * 7 - 3 * 3)
    assert flax_trace("resnet18", True, (33, 47), 1000)[1] == small


def test_flax_model_built_from_a_list_is_hashable() -> None:
    # The seed writes ResNet(BottleNeck, [3, 4, 6, 3]); a Flax module must hash to be a static jit argument.
    from_list = resnet_flax.ResNet(resnet_flax.BottleNeck, [3, 4, 6, 3])
    assert from_list == resnet_flax.resnet50() and hash(from_list) == hash(resnet_flax.resnet50())


def _keyword_options(init: Callable[..., object]) -> dict[str, object]:
    """A constructor's keyword-only options and their defaults (linen: its dataclass fields after KW_ONLY)."""
    params = inspect.signature(init).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def test_options_are_keyword_only_with_the_same_names_and_defaults() -> None:
    """torch, linen and NNX: (block, num_block) positional, every other option by keyword, an option
    shared by two sides has one name and one default; the seed's calls keep working."""
    torch_options = _keyword_options(resnet_torch.ResNet)
    linen_options = {k: v for k, v in _keyword_options(resnet_flax.ResNet).items() if k not in ("parent", "name")}
    nnx_options = _keyword_options(flax_nnx.ResNet.__init__)  # NNX's metaclass hides the class's own signature
    assert set(torch_options) == {"num_classes", "init_weights", "zero_init_residual", "small_stem"} | {
        "groups",
        "width_per_group",
        "stem",
        "avg_down",
        "se",
    }
    # linen's layer kinds are options (an immutable module); NNX's fused/fold change the built layers.
    assert set(linen_options) - set(nnx_options) == {"conv", "norm"}
    assert set(nnx_options) - set(linen_options) == {"rngs"}
    for a, b in ((torch_options, linen_options), (linen_options, nnx_options), (torch_options, nnx_options)):
        assert {k: a[k] for k in a.keys() & b.keys()} == {k: b[k] for k in a.keys() & b.keys()}
    for framework in (resnet_torch, resnet_flax):
        with pytest.raises(TypeError, match="positional"):
            framework.ResNet(framework.BottleNeck, [3, 4, 6, 3], 10)
    with pytest.raises(TypeError, match="positional"):
        flax_nnx.ResNet(flax_nnx.BottleNeck, [3, 4, 6, 3], 10, rngs=nnx.Rngs(0))
    with torch.device("meta"):
        assert resnet_torch.resnet50().fc.out_features == 10
        assert resnet_torch.resnet50(num_classes=1000).fc.out_features == 1000
    assert resnet_flax.resnet50(num_classes=1000, dtype=jnp.float32).num_classes == 1000
    model = nnx.eval_shape(lambda: flax_nnx.resnet50(num_classes=1000, rngs=nnx.Rngs(0)))
    assert model.fc.kernel.get_value().shape == (2048, 1000)


# ---------------------------------------------------------------- initialization
# One model per (block type, init_weights), one block per stage: every layer kind and width, and
# few Flax compiles. The seed-init models also set zero_init_residual=True, so one model checks
# every rule; the init_weights=False model leaves it off and shows the last BN scale at 1.


def _flax_params(model: resnet_flax.ResNet) -> dict:
    """Initial params; lazy_init skips the forward pass and one jit compiles every initializer at once.

    An "rbg" key (XLA's RngBitGenerator) compiles faster than threefry; the initializers draw
    the same distributions from any key, and those are what the tests check.
    """
    probe = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    init = jax.jit(lambda key: model.lazy_init(key, probe, train=False))
    return init(jax.random.key(0, impl="rbg"))["params"]


def _options(init_weights: bool) -> dict:
    return dict(num_classes=1000, init_weights=init_weights, zero_init_residual=init_weights)


@functools.cache
def flax_init(block: str, init_weights: bool) -> dict:
    model = resnet_flax.ResNet(resnet_flax.model.BLOCKS[block], (1, 1, 1, 1), **_options(init_weights))
    return jax.tree_util.tree_map(np.asarray, _flax_params(model))


def torch_init(block: str, init_weights: bool) -> dict[str, np.ndarray]:
    model = resnet_torch.ResNet(resnet_torch.model.BLOCKS[block], [1, 1, 1, 1], **_options(init_weights))
    return {k: v.detach().numpy() for k, v in model.named_parameters()}


def _flax_leaf(params: dict, key: str) -> np.ndarray:
    """A Flax param by its torch key, in torch's layout (OIHW, (out, in))."""
    *path, leaf = key.split(".")
    node = params
    for part in path:
        node = node[part]
    value = node["kernel" if leaf == "weight" and "kernel" in node else "scale" if leaf == "weight" else leaf]
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    return value.T if value.ndim == 2 else value


def both_sides(block: str, init_weights: bool = True) -> list[tuple[str, dict[str, np.ndarray]]]:
    """[("torch", params), ("flax", params)], both keyed and laid out as torch's state dict."""
    t = torch_init(block, init_weights)
    f = flax_init(block, init_weights)
    return [("torch", t), ("flax", {k: _flax_leaf(f, k) for k in t})]


@pytest.mark.parametrize("block", ["BasicBlock", "BottleNeck"])
def test_conv_init_is_untruncated_kaiming_fan_out_on_both_sides(block: str) -> None:
    for side, params in both_sides(block):
        convs = {k: v for k, v in params.items() if v.ndim == 4}
        assert len(convs) >= 10
        for key, w in convs.items():
            out_channels, _, kh, kw = w.shape
            target = np.sqrt(2.0 / (out_channels * kh * kw))
            if w.size >= 10_000:
                assert abs(w.std() / target - 1) < 0.05, (side, key, w.std(), target)
                assert abs(w.mean()) < 0.05 * target, (side, key)
        big = max(convs.values(), key=lambda w: w.size)
        assert big.size >= 1_000_000
        # A normal truncated at 2 std never exceeds 2 std; an untruncated one of 1M draws does.
        assert np.abs(big).max() / big.std() > 3, side


@pytest.mark.parametrize("block", ["BasicBlock", "BottleNeck"])
def test_linear_batchnorm_and_zero_init_residual_on_both_sides(block: str) -> None:
    last = "4" if block == "BasicBlock" else "7"  # the block's last BatchNorm in residual_function
    for side, params in both_sides(block):
        assert params["fc.weight"].shape == (1000, 512 * EXPANSION[block])
        assert abs(params["fc.weight"].std() / 0.01 - 1) < 0.02, side
        assert np.all(params["fc.bias"] == 0), side
        scales = {k: v for k, v in params.items() if v.ndim == 1 and k.endswith(".weight")}
        zeroed = {k for k in scales if f".residual_function.{last}." in k}
        assert len(zeroed) == len(STAGES), side
        for key, scale in scales.items():
            assert np.all(scale == (0 if key in zeroed else 1)), (side, key)
        biases = [v for k, v in params.items() if v.ndim == 1 and k.endswith(".bias")]
        assert len(biases) == len(scales) + 1 and all(np.all(b == 0) for b in biases), side


def test_init_weights_false_gives_torch_default_uniform_bounds() -> None:
    # BottleNeck: 1x1, 3x3 and 7x7 kernels and the classifier, every fan_in kind.
    for side, params in both_sides("BottleNeck", init_weights=False):
        for key, w in params.items():
            if w.ndim == 4:
                bound = 1 / np.sqrt(np.prod(w.shape[1:]))
            elif key.startswith("fc."):
                bound = 1 / np.sqrt(params["fc.weight"].shape[1])
            else:  # BatchNorm: weight 1 (the last one too: zero_init_residual is off), bias 0
                assert np.all(w == (1 if key.endswith("weight") else 0)), (side, key)
                continue
            assert np.abs(w).max() <= bound * (1 + 1e-6), (side, key)
            if w.size >= 10_000:
                # U(-b, b): std b/sqrt(3), and the extremes come close to b.
                assert abs(w.std() / (bound / np.sqrt(3)) - 1) < 0.05, (side, key)
                assert np.abs(w).max() > 0.99 * bound, (side, key)


# ---------------------------------------------------------------- BatchNorm against torch


BN_BATCHES = [(6, 5, 7, 4), (3, 9, 11, 4), (2, 1, 3, 4), (5, 13, 2, 4)]


def _bn_case(torch_dtype: torch.dtype, jax_dtype, tol: float) -> None:
    c = BN_BATCHES[0][-1]
    gen = torch.Generator().manual_seed(1)
    ref = torch.nn.BatchNorm2d(c, dtype=torch_dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(c, generator=gen, dtype=torch_dtype) + 0.5)
        ref.bias.copy_(torch.randn(c, generator=gen, dtype=torch_dtype))
    train_bn = BatchNorm2d(c, use_running_average=False, param_dtype=jax_dtype)
    eval_bn = BatchNorm2d(c, use_running_average=True, param_dtype=jax_dtype)
    variables = train_bn.init(jax.random.key(0), jnp.ones(BN_BATCHES[0], jax_dtype))
    variables = {
        "params": {"scale": jnp.asarray(ref.weight.detach().numpy()), "bias": jnp.asarray(ref.bias.detach().numpy())},
        "batch_stats": variables["batch_stats"],
    }

    for step, shape in enumerate(BN_BATCHES, start=1):
        x = torch.randn(*shape, generator=gen, dtype=torch_dtype) * 3 + 1.5  # NHWC
        ref.train()
        with torch.no_grad():
            want = ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
        got, updates = train_bn.apply(variables, jnp.asarray(x.numpy()), mutable=["batch_stats"])
        variables = {**variables, **updates}
        stats = variables["batch_stats"]
        assert got.dtype == jax_dtype and stats["mean"].dtype == jax_dtype
        assert rel_err(got, want) <= tol
        assert rel_err(stats["mean"], ref.running_mean.numpy()) <= tol
        assert rel_err(stats["var"], ref.running_var.numpy()) <= tol
        assert int(stats["num_batches_tracked"]) == int(ref.num_batches_tracked) == step

        ref.eval()
        with torch.no_grad():
            want = ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
        assert rel_err(eval_bn.apply(variables, jnp.asarray(x.numpy())), want) <= tol


def test_batchnorm_matches_torch_fp32() -> None:
    _bn_case(torch.float32, jnp.float32, 1e-5)


def test_batchnorm_matches_torch_fp64() -> None:
    with jax.enable_x64(True):
        _bn_case(torch.float64, jnp.float64, 1e-12)


def test_batchnorm_keeps_float32_statistics_for_bf16_input() -> None:
    x32 = torch.randn(6, 5, 7, 4) * 3 + 1.5
    x16 = jnp.asarray(x32.numpy()).astype(jnp.bfloat16)
    bn = BatchNorm2d(4, use_running_average=False)
    variables = bn.init(jax.random.key(0), x16)
    y, updates = bn.apply(variables, x16, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    assert updates["batch_stats"]["mean"].dtype == jnp.float32
    assert updates["batch_stats"]["var"].dtype == jnp.float32

    # The same bf16 values in float32 through torch: statistics agree to float32 rounding,
    # far below bf16's ~4e-3 resolution, so they were not computed in bf16.
    ref = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        ref(torch.tensor(np.asarray(x16.astype(jnp.float32))).permute(0, 3, 1, 2))
    assert rel_err(updates["batch_stats"]["mean"], ref.running_mean.numpy()) <= 1e-5
    assert rel_err(updates["batch_stats"]["var"], ref.running_var.numpy()) <= 1e-5


def test_bf16_model_keeps_float32_batch_stats() -> None:
    model = resnet_flax.ResNet(resnet_flax.BasicBlock, (1, 1, 1, 1), small_stem=True, dtype=jnp.bfloat16)

    def train_step(x: jax.Array) -> tuple[jax.Array, dict]:
        variables = model.init(jax.random.key(0), x, train=False)
        return model.apply(variables, x, train=True, mutable=["batch_stats"])

    # dtypes are fixed when tracing, so eval_shape answers without computing.
    logits, updates = jax.eval_shape(train_step, jax.ShapeDtypeStruct((2, 9, 11, 3), jnp.float32))
    assert logits.dtype == jnp.bfloat16 and logits.shape == (2, 10)
    flat = jax.tree_util.tree_leaves_with_path(updates["batch_stats"])
    floats = [leaf for path, leaf in flat if path[-1].key in ("mean", "var")]
    assert len(floats) == 2 * len(flat) // 3 > 0
    assert all(leaf.dtype == jnp.float32 for leaf in floats)


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def tiny_flax() -> resnet_flax.ResNet:
    return resnet_flax.ResNet(resnet_flax.BasicBlock, (1, 1, 1, 1), small_stem=True)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 3, 16, 16), r"NHWC.*3 channels.*looks like NCHW"),
        ((2, 16, 16, 4), r"NHWC input with 3 channels last"),
        ((2, 16, 16, 1), r"NHWC input with 3 channels last"),
        ((16, 16, 3), r"rank 4"),
        ((1, 2, 16, 16, 3), r"rank 4"),
    ],
    ids=["nchw", "4-channels", "grey", "rank-3", "rank-5"],
)
def test_flax_rejects_bad_input_with_what_it_expects(tiny_flax, shape, match) -> None:
    x = jnp.asarray(np.random.default_rng(3).standard_normal(shape, dtype=np.float32))
    with pytest.raises(ValueError, match=match):
        tiny_flax.init(jax.random.key(0), x, train=False)


BAD_NUM_BLOCK = [[3, 4, 6], [3, 4, 6, 3, 1], [3, 0, 6, 3], [3, 4.0, 6, 3], [True, 1, 1, 1], "3463"]
BAD_NUM_CLASSES = [0, -1, 2.5, True, "10"]


@pytest.mark.parametrize("framework", [resnet_torch, resnet_flax])
def test_bad_options_raise_value_error(framework) -> None:
    for num_block in BAD_NUM_BLOCK:
        with pytest.raises(ValueError, match=r"num_block must be 4 positive ints"):
            framework.ResNet(framework.BottleNeck, num_block)
    for num_classes in BAD_NUM_CLASSES:
        with pytest.raises(ValueError, match=r"num_classes must be a positive int"):
            framework.resnet18(num_classes=num_classes)
    with pytest.raises(ValueError, match=r"unknown arch 'resnet51'; expected one of resnet18, resnet34"):
        framework.build("resnet51")
    other = resnet_flax if framework is resnet_torch else resnet_torch
    with pytest.raises(ValueError, match=r"block must be one of BasicBlock, BottleNeck"):
        framework.ResNet(other.BottleNeck, [3, 4, 6, 3])


# ---------------------------------------------------------------- resnet-parity summary


@pytest.mark.parametrize("framework", ["torch", "flax"])
def test_summary_table_names_stages_shapes_and_total(framework: str, capsys) -> None:
    hw = (97, 131)
    argv = ["summary", "--arch", "resnet50", "--framework", framework, "--num-classes", "1000"]
    assert main([*argv, "--input-size", *map(str, hw)]) == 0
    out = capsys.readouterr().out
    for name in STAGE_OUTPUTS:  # a row per stage: torchinfo's "Sequential (conv2_x)", tabulate's "│ conv2_x "
        assert (f"({name})" if framework == "torch" else f"│ {name} ") in out, name
    assert f"Total params: {TORCHVISION_PARAMS['resnet50']:,}" in out
    last = expected_nchw("resnet50", False, 1, *hw, num_classes=1000)["conv5_x"]
    # torchinfo writes [1, 2048, 4, 5]; nn.tabulate writes float32[1,4,5,2048].
    shown = str(list(last)) if framework == "torch" else str(list(nhwc(last))).replace(" ", "")
    assert shown in out


@pytest.mark.parametrize("framework, sep", [("torch", "."), ("flax", "/")])
def test_summary_modules_and_parameters(framework: str, sep: str, capsys) -> None:
    base = ["summary", "--arch", "resnet18", "--framework", framework, "--small-stem"]
    assert main([*base, "--show", "modules"]) == 0
    modules = capsys.readouterr().out
    assert f"conv5_x{sep}1{sep}residual_function{sep}4 " in modules
    assert "MaxPool2d" not in modules and "max_pool2d" not in modules  # the small stem has none

    assert main([*base, "--show", "parameters", "--num-classes", "1000"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    params = list(meta_torch("resnet18", num_classes=1000, small_stem=True).parameters())
    assert lines[-1] == f"Total params: {sum(p.numel() for p in params):,} in {len(params)} tensors"
    assert len(lines) == len(params) + 1
    assert lines[0].split()[0] == f"conv1{sep}0{sep}" + ("weight" if framework == "torch" else "kernel")


def test_summary_rejects_bad_arguments(capsys) -> None:
    for argv in (["--num-classes", "0"], ["--input-size", "32"], ["--framework", "jax"], ["--arch", "resnet51"]):
        with pytest.raises(SystemExit) as exc:
            main(["summary", *argv])
        assert exc.value.code == 2
    assert "expected a positive integer, got 0" in capsys.readouterr().err
