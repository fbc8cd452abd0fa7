"""The ResNet family (ResNeXt, Wide ResNet, ResNet-D, SE-ResNet) as options of the one ResNet, in torch,
linen and NNX: the table, the shapes and forward pass of torchvision's and timm's own models, and the
Flax mirrors against the torch model."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import timm
import torch
import torchvision
from flax import nnx, traverse_util

import resnet_flax
import resnet_torch
from parity.checks.pairs import randomize_batchnorm
from parity.conversion import rules
from resnet_arch import ARCH_NAMES, DEPTHS, VARIANTS, make_divisible, resolve_arch, se_width
from resnet_flax import nnx as flax_nnx
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
        assert getattr(resnet_torch, name).__name__ == name
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
    with pytest.raises(ValueError, match=re.escape(match)):
        resnet_torch.build("resnet18", **options)


# ---------------------------------------------------------------- torch against torchvision and timm


@pytest.mark.parametrize("name", list(LIBRARY_MODELS))
def test_state_dict_shapes_and_counts_are_the_librarys(name: str) -> None:
    with torch.device("meta"):
        ours = resnet_torch.build(name, num_classes=1000).state_dict()
        theirs = library_in_seed_keys(LIBRARY_MODELS[name](), avg_down=VARIANTS[name][1].get("avg_down", False))
    assert shapes(ours) == shapes(theirs)
    assert sum(v.numel() for v in ours.values()) == sum(v.numel() for v in theirs.values())


def _tiny_library_model(name: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A library model of one block per stage with our builder's options for it."""
    if name == "resnext":
        block, options = torchvision.models.resnet.Bottleneck, dict(groups=4, width_per_group=8)
        return torchvision.models.resnet.ResNet(block, [1, 1, 1, 1], num_classes=7, **options), options
    if name == "wide":
        block, options = torchvision.models.resnet.Bottleneck, dict(width_per_group=96)
        return torchvision.models.resnet.ResNet(block, [1, 1, 1, 1], num_classes=7, **options), options
    timm_block = timm.models.resnet.Bottleneck
    if name == "resnet-d":
        library = timm.models.resnet.ResNet(
            timm_block, [1, 1, 1, 1], num_classes=7, stem_width=32, stem_type="deep", avg_down=True
        )
        return library, dict(stem="deep", avg_down=True)
    library = timm.models.resnet.ResNet(timm_block, [1, 1, 1, 1], num_classes=7, block_args=dict(attn_layer="se"))
    return library, dict(se=True)


@pytest.mark.parametrize("name", ["resnext", "wide", "resnet-d", "se"])
def test_forward_equals_the_librarys_with_its_weights_fp64(name: str) -> None:
    library, options = _tiny_library_model(name)
    randomize_batchnorm(library, torch.Generator().manual_seed(3))
    ours = resnet_torch.ResNet(resnet_torch.BottleNeck, [1, 1, 1, 1], num_classes=7, **options)
    ours.load_state_dict(library_in_seed_keys(library, options.get("avg_down", False)), strict=True)
    library, ours = library.double().eval(), ours.double().eval()
    x = torch.randn(2, 3, *ODD, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        want, got = library(x), ours(x)
    assert torch.equal(got, want) or float((got - want).abs().max() / want.abs().max()) < 1e-13


# ---------------------------------------------------------------- the Flax mirrors against the torch model
# One model per option, one block per stage, float64 on odd sizes (33 -> 9, 5, 3 at the pooled stages):
# linen against torch at the parity checks' float64 bar, NNX against linen bit for bit.

FAMILY_CASES = {
    "grouped": ("BottleNeck", dict(groups=4, width_per_group=8)),
    "wide": ("BottleNeck", dict(width_per_group=96)),
    "deep-stem-avg-down": ("BasicBlock", dict(stem="deep", avg_down=True)),
    "se": ("BasicBlock", dict(se=True)),  # timm's SE block is the same on either block; BasicBlock compiles faster
}
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


def _torch_results(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    model.eval()
    with torch.no_grad():
        eval_logits = model(x)
    model.train()
    logits = model(x)
    torch.nn.functional.cross_entropy(logits, y).backward()
    state = model.state_dict()
    return {
        "eval": [eval_logits.numpy()],
        "train": [logits.detach().numpy()],
        "stats": {k: v.numpy() for k, v in state.items() if "running_" in k},
        "grads": {k: p.grad.numpy() for k, p in model.named_parameters()},
    }


def _linen_results(model: resnet_flax.ResNet, variables: dict[str, Any], x: jax.Array, y: jax.Array) -> Any:
    """(eval logits, train-mode logits, the statistics after that call, the loss's gradients), one program."""

    def loss(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
        logits, updated = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, updated["batch_stats"])

    @jax.jit
    def run(variables: Any) -> Any:
        grads, (logits, stats) = jax.grad(loss, has_aux=True)(variables["params"])
        return model.apply(variables, x, train=False), logits, stats, grads

    return run(variables)


def _linen_forward(model: resnet_flax.ResNet, variables: dict[str, Any], x: jax.Array) -> tuple[Any, Any, Any]:
    """(eval logits, train-mode logits, the statistics after the train-mode call)."""

    @jax.jit
    def run(variables: Any) -> Any:
        logits, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return model.apply(variables, x, train=False), logits, updated["batch_stats"]

    return run(variables)


def _nnx_forward(model: flax_nnx.ResNet, variables: dict[str, Any], x: jax.Array) -> tuple[Any, Any, Any]:
    """``_linen_forward`` of an NNX model given ``variables`` (the statistics as a linen tree)."""
    state = nnx.state(model)
    merged = traverse_util.unflatten_dict(
        {**traverse_util.flatten_dict(variables["params"]), **traverse_util.flatten_dict(variables["batch_stats"])}
    )
    nnx.replace_by_pure_dict(state, merged)
    nnx.update(model, state)
    graphdef, state = nnx.split(model)

    @jax.jit
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


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_linen_equals_torch_fp64(case: str) -> None:
    """Eval logits, train-mode logits, running statistics and gradients at the float64 parity bar."""
    block_name, options = FAMILY_CASES[case]
    torch_model = _torch_model(block_name, options)
    x, y = _batch()
    variables = _flax_variables(torch_model.state_dict())
    want = _torch_results(torch_model, x, y)
    with jax.enable_x64(True):
        linen = resnet_flax.ResNet(resnet_flax.model.BLOCKS[block_name], (1, 1, 1, 1), **_fp64(options))
        eval_logits, logits, stats, grads = _linen_results(
            linen, jax.tree.map(jnp.asarray, variables), _nhwc(x), jnp.asarray(y.numpy())
        )
    assert _rel([eval_logits], want["eval"]) < FP64_BAR
    assert _rel([logits], want["train"]) < FP64_BAR
    by_key = rules.torch_layout({"batch_stats": stats})
    assert _rel([by_key[k] for k in want["stats"]], list(want["stats"].values())) < FP64_BAR
    by_key = rules.torch_layout({"params": grads})
    assert by_key.keys() == want["grads"].keys()
    assert _rel([by_key[k] for k in want["grads"]], list(want["grads"].values())) < FP64_BAR


def test_nnx_is_bit_identical_to_linen_with_every_option() -> None:
    """Eval logits, train-mode logits and updated statistics of one model with every family option."""
    options = dict(groups=2, width_per_group=32, stem="deep", avg_down=True, se=True)
    variables = _flax_variables(_torch_model("BottleNeck", options).state_dict())
    x = _batch()[0]
    with jax.enable_x64(True):
        variables = jax.tree.map(jnp.asarray, variables)
        linen = resnet_flax.ResNet(resnet_flax.BottleNeck, (1, 1, 1, 1), **_fp64(options))
        eval_logits, logits, stats = _linen_forward(linen, variables, _nhwc(x))
        model = flax_nnx.ResNet(flax_nnx.BottleNeck, (1, 1, 1, 1), **_fp64(options), rngs=nnx.Rngs(init_key(0)))
        nnx_eval, nnx_logits, nnx_stats = _nnx_forward(model, variables, _nhwc(x))
    np.testing.assert_array_equal(np.asarray(nnx_eval), np.asarray(eval_logits))
    np.testing.assert_array_equal(np.asarray(nnx_logits), np.asarray(logits))
    linen_stats, flat_nnx = traverse_util.flatten_dict(stats), traverse_util.flatten_dict(nnx_stats)
    assert flat_nnx.keys() == linen_stats.keys()
    assert all(np.array_equal(flat_nnx[k], linen_stats[k]) for k in linen_stats)
