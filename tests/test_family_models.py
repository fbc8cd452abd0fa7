"""The ResNet family (ResNeXt, Wide ResNet, ResNet-D, SE-ResNet) as options of the one ResNet, in torch,
linen and NNX: the table, the option checks, the state-dict shapes of torchvision's and timm's own
models, NNX against linen, folding, initialisation and the compiled grouped convolution and SE.

The numbers of each option are proven in tests/test_family_convert.py, once per fact: the libraries'
models == linen (every float64 check) and == resnet_torch (float64 eval, train mode, statistics,
gradients), so resnet_torch == linen; NNX == linen bit for bit is proven here.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import torchvision
from flax import nnx, traverse_util

import resnet_flax
import resnet_torch
from parity.checks.pairs import randomize_batchnorm
from parity.conversion import rules
from resnet_arch import ARCH_NAMES, DEPTHS, FAMILY_OPTIONS, VARIANTS, make_divisible, resolve_arch, se_width
from resnet_flax import nnx as flax_nnx
from resnet_flax.fold import fold as linen_fold
from resnet_flax.fused import fused
from resnet_flax.model import init_key

ODD = (33, 35)  # odd sizes: the ceil-mode average pool's last window is partial here

# One builder of each family against the library that defines it.
LIBRARY_MODELS = {
    "resnext50_32x4d": lambda: torchvision.models.resnext50_32x4d(),
    "wide_resnet50_2": lambda: torchvision.models.wide_resnet50_2(),
    "resnet50d": lambda: timm.create_model("resnet50d", pretrained=False),
    "resnet18d": lambda: timm.create_model("resnet18d", pretrained=False),
    "seresnet50": lambda: timm.create_model("seresnet50", pretrained=False),
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """torch on one thread: on these small inputs a second one only adds synchronisation, which costs
    many times the work itself on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# torchvision/timm module names -> the seed's (the test's own map; parity.conversion has the product's).
_BLOCK_LAYERS = {"conv1": 0, "bn1": 1, "conv2": 3, "bn2": 4, "conv3": 6, "bn3": 7}


def seed_key(key: str, avg_down: bool) -> str:
    """A torchvision or timm state-dict key under the seed's module names."""
    key = re.sub(r"^conv1\.weight$", "conv1.0.weight", key)
    key = re.sub(r"^bn1\.", "conv1.7." if avg_down else "conv1.1.", key)  # timm's deep stem ends in bn1
    key = re.sub(r"^layer(\d)\.", lambda m: f"conv{int(m[1]) + 1}_x.", key)
    key = re.sub(
        r"_x\.(\d+)\.(conv|bn)(\d)\.", lambda m: f"_x.{m[1]}.residual_function.{_BLOCK_LAYERS[m[2] + m[3]]}.", key
    )
    return key.replace(".downsample.", ".shortcut.")


def library_in_seed_keys(model: torch.nn.Module, avg_down: bool) -> dict[str, torch.Tensor]:
    return {seed_key(k, avg_down): v for k, v in model.state_dict().items()}


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


# ---------------------------------------------------------------- the table


def test_every_name_builds_and_the_rows_are_the_libraries() -> None:
    assert ARCH_NAMES == (*DEPTHS, *VARIANTS) and len(set(ARCH_NAMES)) == len(ARCH_NAMES) == 18
    for name in ARCH_NAMES:
        depth, row = VARIANTS.get(name, (name, {}))
        assert getattr(resnet_torch, name).__name__ == getattr(flax_nnx, name).__name__ == name
        assert name in resnet_torch.__all__ and name in resnet_flax.__all__
        linen = getattr(resnet_flax, name)(num_classes=3)
        assert (linen.block.__name__, linen.num_block) == DEPTHS[depth]
        assert {k: getattr(linen, k) for k in FAMILY_OPTIONS} == {**FAMILY_OPTIONS, **row}
    assert resolve_arch("resnext101_64x4d", {"num_classes": 3}) == (
        "BottleNeck",
        (3, 4, 23, 3),
        {"num_classes": 3, "groups": 64, "width_per_group": 4},
    )
    # Restating a row's value is allowed; contradicting it is refused naming both values.
    assert resolve_arch("resnet50d", {"avg_down": True})[2]["avg_down"] is True
    with pytest.raises(ValueError, match=r"resnext50_32x4d has groups=32; got groups=8"):
        resolve_arch("resnext50_32x4d", {"groups": 8})
    with pytest.raises(ValueError, match="unknown arch 'resnext'; expected one of resnet18, .*seresnet152"):
        resnet_torch.build("resnext")


def test_se_width_is_timms() -> None:
    for channels in (64, 128, 256, 512, 1024, 2048, 200, 24):
        assert se_width(channels) == timm.layers.make_divisible(channels / 16, 8, round_limit=0.0)
    for value in (3.0, 12.0, 13.0, 100.0, 27.5):
        assert make_divisible(value) == timm.layers.make_divisible(value)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(groups=0), "groups must be a positive int, got 0"),
        (dict(width_per_group=2.5), "width_per_group must be a positive int, got 2.5"),
        (dict(stem="tiered"), "stem must be one of default, deep, got 'tiered'"),
        (dict(stem="deep", small_stem=True), "stem='deep' and small_stem=True both replace the stem"),
        (dict(se=1), "se must be True or False, got 1"),
        (dict(groups=2), "BasicBlock only supports groups=1 and width_per_group=64, got groups=2"),
        (dict(width_per_group=128), "BasicBlock only supports groups=1 and width_per_group=64"),
    ],
)
def test_bad_family_options_are_refused_with_a_sentence(options: dict[str, Any], match: str) -> None:
    for build in (resnet_torch.build, resnet_flax.build, functools.partial(flax_nnx.build, rngs=nnx.Rngs(0))):
        with pytest.raises(ValueError, match=re.escape(match)):
            build("resnet18", **options)
    if match.startswith("BasicBlock"):  # a BasicBlock built on its own refuses them too, as torchvision's does
        for block in (
            functools.partial(resnet_torch.BasicBlock, 64, 64),
            lambda **o: resnet_flax.BasicBlock(64, 64, **o),
            functools.partial(flax_nnx.BasicBlock, 64, 64, rngs=nnx.Rngs(0)),
        ):
            with pytest.raises(ValueError, match=re.escape(match)):
                block(**options)


def test_the_family_options_have_the_same_defaults_on_every_side() -> None:
    """Every side's ResNet takes the family's options by keyword, with FAMILY_OPTIONS' defaults."""
    for init in (resnet_torch.ResNet, resnet_flax.ResNet, flax_nnx.ResNet.__init__):
        params = inspect.signature(init).parameters
        assert {k: params[k].default for k in FAMILY_OPTIONS} == FAMILY_OPTIONS
        assert all(params[k].kind is inspect.Parameter.KEYWORD_ONLY for k in FAMILY_OPTIONS)


# ---------------------------------------------------------------- torch against torchvision and timm


@pytest.mark.parametrize("name", list(LIBRARY_MODELS))
def test_state_dict_shapes_and_counts_are_the_librarys(name: str) -> None:
    with torch.device("meta"):
        ours = resnet_torch.build(name, num_classes=1000).state_dict()
        theirs = library_in_seed_keys(LIBRARY_MODELS[name](), avg_down=VARIANTS[name][1].get("avg_down", False))
    assert shapes(ours) == shapes(theirs)
    assert sum(v.numel() for v in ours.values()) == sum(v.numel() for v in theirs.values())


# ---------------------------------------------------------------- the Flax mirrors against each other
# linen == torch for every option is proven through the libraries' models in tests/test_family_convert.py
# (library == linen and library == resnet_torch, float64); here NNX == linen bit for bit, on one model with
# every option, one block per stage, float64 on odd sizes (33 -> 9, 5, 3 at the pooled stages).

FP64_BAR = 1e-10  # the float64 tolerance of every parity check (parity.checks.precision)
NUM_CLASSES = 5


def _rel(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """||got - want|| / ||want|| over all tensors together, as the parity checks measure."""
    g = np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in got])
    w = np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in want])
    return float(np.linalg.norm(g - w) / np.linalg.norm(w))


def _flax_variables(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A torch state dict as Flax variables by the one name rule (parity.conversion.rules) alone."""
    flat = {}
    for key, value in state.items():
        rule = rules.torch_rule(key, value.ndim)
        assert rule is not None, key
        a = value.numpy().copy()  # the torch train step below updates the statistics in place
        flat[rule.flax_path(key)] = a if rule.perm is None else a.transpose(rule.perm)
    return traverse_util.unflatten_dict(flat)


def _linen_forward(model: resnet_flax.ResNet, variables: dict[str, Any], x: jax.Array) -> tuple[Any, Any, Any]:
    """(eval logits, train-mode logits, the statistics after the train-mode call), run eagerly."""

    def run(variables: Any) -> Any:
        logits, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return model.apply(variables, x, train=False), logits, updated["batch_stats"]

    return run(variables)


def _load(model: flax_nnx.ResNet, variables: dict[str, Any]) -> flax_nnx.ResNet:
    """Put linen ``variables`` (the same paths) into an NNX model; the model."""
    state = nnx.state(model)
    merged = traverse_util.unflatten_dict(
        {**traverse_util.flatten_dict(variables["params"]), **traverse_util.flatten_dict(variables["batch_stats"])}
    )
    nnx.replace_by_pure_dict(state, merged)
    nnx.update(model, state)
    return model


def _nnx_forward(model: flax_nnx.ResNet, variables: dict[str, Any], x: jax.Array) -> tuple[Any, Any, Any]:
    """``_linen_forward`` of an NNX model given ``variables`` (the statistics as a linen tree), run eagerly."""
    _load(model, variables)
    graphdef, state = nnx.split(model)

    def run(state: Any) -> Any:
        m = nnx.merge(graphdef, state)
        m.eval()
        eval_logits = m(x)
        m.train()  # the train-mode call updates the statistics in place, so it comes second
        return eval_logits, m(x), nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))

    return run(state)


def _torch_model(block_name: str, options: dict[str, Any]) -> torch.nn.Module:
    """A float64 torch model of one block per stage, random BatchNorms and (with se) random SE biases."""
    torch_model = resnet_torch.ResNet(
        resnet_torch.model.BLOCKS[block_name], [1, 1, 1, 1], num_classes=NUM_CLASSES, **options
    )
    randomize_batchnorm(torch_model, torch.Generator().manual_seed(4))
    with torch.no_grad():  # the seed init zeroes the SE biases; random ones show they are converted
        for m in torch_model.modules():
            if isinstance(m, resnet_torch.SqueezeExcite):
                m.fc1.bias.normal_(0, 0.1), m.fc2.bias.normal_(0, 0.1)
    return torch_model.double()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, *ODD, generator=g, dtype=torch.float64), torch.randint(0, NUM_CLASSES, (2,), generator=g)


def _nhwc(x: torch.Tensor) -> jax.Array:
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _fp64(options: dict[str, Any]) -> dict[str, Any]:
    return dict(num_classes=NUM_CLASSES, dtype=jnp.float64, param_dtype=jnp.float64, **options)


def test_nnx_is_bit_identical_to_linen_and_both_fold_every_option() -> None:
    """One model with every family option: NNX gives linen's eval logits, train-mode logits and updated
    statistics bit for bit; folding the deep stem's, the grouped and the average-pool shortcut's conv-BN
    pairs keeps the eval logits (SE's biased convolutions stay as they are), and both APIs fold alike."""
    options = dict(groups=2, width_per_group=32, stem="deep", avg_down=True, se=True)
    variables = _flax_variables(_torch_model("BottleNeck", options).state_dict())
    x = _batch()[0]
    with jax.enable_x64(True):
        variables = jax.tree.map(jnp.asarray, variables)
        linen = resnet_flax.ResNet(resnet_flax.BottleNeck, (1, 1, 1, 1), **_fp64(options))
        eval_logits, logits, stats = _linen_forward(linen, variables, _nhwc(x))
        folded, folded_variables = linen_fold(linen, variables)
        folded_logits = folded.apply(folded_variables, _nhwc(x))
        # Built abstract (no random init to compute): _load gives it the variables.
        model = nnx.eval_shape(
            lambda: flax_nnx.ResNet(flax_nnx.BottleNeck, (1, 1, 1, 1), **_fp64(options), rngs=nnx.Rngs(0))
        )
        nnx_folded = flax_nnx.fold(_load(model, variables))
        nnx_eval, nnx_logits, nnx_stats = _nnx_forward(model, variables, _nhwc(x))
    np.testing.assert_array_equal(np.asarray(nnx_eval), np.asarray(eval_logits))
    np.testing.assert_array_equal(np.asarray(nnx_logits), np.asarray(logits))
    linen_stats, flat_nnx = traverse_util.flatten_dict(stats), traverse_util.flatten_dict(nnx_stats)
    assert flat_nnx.keys() == linen_stats.keys()
    assert all(np.array_equal(flat_nnx[k], linen_stats[k]) for k in linen_stats)

    assert _rel([folded_logits], [eval_logits]) < FP64_BAR
    params = traverse_util.flatten_dict(folded_variables["params"], sep="/")
    for path in ("conv1/6/bias", "conv2_x/0/shortcut/1/bias", "conv2_x/0/residual_function/3/bias"):
        assert path in params
    assert not any(p.startswith("conv1/7/") for p in params)
    se_bias = variables["params"]["conv2_x"]["0"]["se"]["fc1"]["bias"]
    np.testing.assert_array_equal(params["conv2_x/0/se/fc1/bias"], se_bias)
    nnx_params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(nnx_folded, nnx.Param)), sep="/")
    assert nnx_params.keys() == params.keys()
    assert all(np.array_equal(nnx_params[k], params[k]) for k in params)
    assert fused(linen).se and flax_nnx.is_fused(flax_nnx.fused(model))


def test_flax_trees_have_the_torch_models_shapes() -> None:
    """linen and NNX trees, by the name rule, hold the torch state dict's keys and shapes: every option."""
    options = dict(num_classes=NUM_CLASSES, groups=2, width_per_group=32, stem="deep", avg_down=True, se=True)
    with torch.device("meta"):
        want = shapes(resnet_torch.ResNet(resnet_torch.BottleNeck, [2, 1, 1, 1], **options).state_dict())
    probe = jax.ShapeDtypeStruct((1, *ODD, 3), jnp.float32)
    linen = resnet_flax.ResNet(resnet_flax.BottleNeck, (2, 1, 1, 1), **options)
    variables = jax.eval_shape(lambda x: linen.init(jax.random.key(0), x), probe)
    model = nnx.eval_shape(lambda: flax_nnx.ResNet(flax_nnx.BottleNeck, (2, 1, 1, 1), **options, rngs=nnx.Rngs(0)))
    state = nnx.to_pure_dict(nnx.state(model))
    for tree in (variables, {c: state for c in rules.COLLECTIONS}):
        leaves = rules.flax_leaves(tree)[0]
        got = {k: rule.torch_shape(tuple(x.shape)) for k, (rule, x) in leaves.items() if k in want or "." in k}
        assert {k: got[k] for k in want} == want
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    assert flat["conv2_x/0/residual_function/3/kernel"].shape == (3, 3, 32, 64)  # grouped: in / groups
    assert flat["conv2_x/0/se/fc1/bias"].shape == (se_width(256),)
    assert "conv2_x/1/shortcut/1/kernel" not in flat and "conv3_x/0/shortcut/0/kernel" not in flat


@pytest.mark.parametrize("init_weights", [True, False])
def test_squeeze_excite_init_follows_the_seed_and_torch(init_weights: bool) -> None:
    """Seed init: kaiming fan_out kernels and zero biases; init_weights=False: torch's default bounds.
    The Flax side is NNX, built eagerly (no compile); linen draws from the same initializers."""
    torch_model = resnet_torch.ResNet(resnet_torch.BasicBlock, [1, 1, 1, 1], se=True, init_weights=init_weights)
    model = flax_nnx.ResNet(
        flax_nnx.BasicBlock, (1, 1, 1, 1), se=True, init_weights=init_weights, rngs=nnx.Rngs(init_key(0))
    )
    se = model.conv5_x[0].se
    for side, fc1_w, fc1_b, fc2_b in (
        ("torch", *(t.detach().numpy() for t in (torch_model.conv5_x[0].se.fc1.weight, *_biases(torch_model)))),
        (
            "flax",
            np.asarray(se.fc1.kernel[...]).transpose(3, 2, 0, 1),
            np.asarray(se.fc1.bias[...]),
            np.asarray(se.fc2.bias[...]),
        ),
    ):
        assert fc1_w.shape == (32, 512, 1, 1), side
        if init_weights:
            assert abs(fc1_w.std() / np.sqrt(2 / 32) - 1) < 0.05 and not fc1_b.any() and not fc2_b.any(), side
        else:
            assert np.abs(fc1_w).max() <= 1 / np.sqrt(512) and 0 < np.abs(fc1_b).max() <= 1 / np.sqrt(512), side
            assert 1 / np.sqrt(32) * 0.5 < np.abs(fc2_b).max() <= 1 / np.sqrt(32), side


def _biases(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    se = model.conv5_x[0].se
    return se.fc1.bias, se.fc2.bias


# ---------------------------------------------------------------- compiled programs


def test_grouped_conv_and_squeeze_excite_compile_to_one_op_each() -> None:
    """A ResNeXt block with SE in eval mode: the grouped 3x3 is one convolution (feature_group_count),
    not one per group, and SE's squeeze is the block's only reduction; no loops."""
    groups = 8
    block = resnet_flax.BottleNeck(
        256,
        64,
        groups=groups,
        width_per_group=8,
        se=True,
        norm=functools.partial(resnet_flax.layers.BatchNorm2d, use_running_average=True),
    )
    x = jnp.zeros((2, 9, 9, 256))
    variables = jax.eval_shape(lambda: block.init(jax.random.key(0), x))
    text = jax.jit(block.apply).lower(variables, x).as_text()
    convolutions = re.findall(r"stablehlo\.convolution\(.*", text)
    grouped = [c for c in convolutions if f"feature_group_count = {groups} " in c]
    assert len(grouped) == 1, convolutions
    # 1x1 convolutions may lower to matrix products: five convolution layers, five ops in all.
    assert len(convolutions) + text.count("stablehlo.dot_general") == 5
    assert text.count("stablehlo.reduce(") == 1
    assert "stablehlo.while" not in text
