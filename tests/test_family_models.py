"""The ResNet family (ResNeXt, Wide ResNet, ResNet-D, SE-ResNet) as options of the one ResNet, in torch,
linen and NNX: the table, the shapes and forward pass of torchvision's and timm's own models, and the
Flax mirrors against the torch model."""

from __future__ import annotations

import re
from typing import Any

import pytest
import timm
import torch
import torchvision

import resnet_torch
from parity.checks.pairs import randomize_batchnorm
from resnet_arch import ARCH_NAMES, DEPTHS, VARIANTS, make_divisible, resolve_arch, se_width

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
