"""The architecture table that both frameworks build from, and the names both sides share.

This module imports no framework: ``resnet_torch`` and ``resnet_flax`` each import it and their
own framework only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

# depth name -> (block class name, blocks per stage); block names resolve in each framework.
DEPTHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("BasicBlock", (2, 2, 2, 2)),
    "resnet34": ("BasicBlock", (3, 4, 6, 3)),
    "resnet50": ("BottleNeck", (3, 4, 6, 3)),
    "resnet101": ("BottleNeck", (3, 4, 23, 3)),
    "resnet152": ("BottleNeck", (3, 8, 36, 3)),
}

STEM_WIDTH = 64
IN_CHANNELS = 3

# builder name -> (depth name in DEPTHS, model options): the family as torchvision and timm build it.
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "resnext50_32x4d": ("resnet50", {"groups": 32, "width_per_group": 4}),
    "resnext101_32x8d": ("resnet101", {"groups": 32, "width_per_group": 8}),
    "resnext101_64x4d": ("resnet101", {"groups": 64, "width_per_group": 4}),
    "wide_resnet50_2": ("resnet50", {"width_per_group": 128}),
    "wide_resnet101_2": ("resnet101", {"width_per_group": 128}),
    **{f"{depth}d": (depth, {"stem": "deep", "avg_down": True}) for depth in DEPTHS},
    **{f"se{depth}": (depth, {"se": True}) for depth in ("resnet50", "resnet101", "resnet152")},
}
# Every builder name: what build(name), --arch and the CLI commands accept.
ARCH_NAMES: tuple[str, ...] = (*DEPTHS, *VARIANTS)

# The family's model options and their defaults (the plain ResNet), the same on torch, linen and NNX.
DEFAULT_STEM, DEEP_STEM = "default", "deep"
STEMS = (DEFAULT_STEM, DEEP_STEM)
FAMILY_OPTIONS: dict[str, object] = {
    "groups": 1,
    "width_per_group": 64,
    "stem": DEFAULT_STEM,
    "avg_down": False,
    "se": False,
}
# torchvision's base width: the bottleneck is int(planes * width_per_group / BASE_WIDTH) * groups wide.
BASE_WIDTH = 64
# The average-pool shortcut (ResNet-D, timm's avg_down): a 2x2 pool carries the stride, not the 1x1 conv.
AVG_DOWN_KERNEL = 2
# The deep stem (ResNet-D, timm's stem_type="deep"): three 3x3 convolutions (in, out, stride), each
# with BatchNorm and ReLU, then the max-pool.
DEEP_STEM_WIDTH = 32
DEEP_STEM_CONVS: tuple[tuple[int, int, int], ...] = (
    (IN_CHANNELS, DEEP_STEM_WIDTH, 2),
    (DEEP_STEM_WIDTH, DEEP_STEM_WIDTH, 1),
    (DEEP_STEM_WIDTH, STEM_WIDTH, 1),
)
# Squeeze-and-excitation: timm's SEModule reduces to channels / SE_RATIO, rounded by make_divisible.
SE_RATIO = 16
SE_DIVISOR = 8

STEM = "conv1"
# (module name, output width before expansion, stride of the stage's first block), as in the seed.
STAGES: tuple[tuple[str, int, int], ...] = (
    ("conv2_x", 64, 1),
    ("conv3_x", 128, 2),
    ("conv4_x", 256, 2),
    ("conv5_x", 512, 2),
)
HEAD = "fc"
# Names of the outputs a model returns with return_stages=True, in order.
STAGE_OUTPUTS: tuple[str, ...] = (STEM, *(name for name, _, _ in STAGES), HEAD)


def arch_name(block_name: str, num_block: tuple[int, ...]) -> str | None:
    """The depth name of a (block, stage sizes) pair, or None for a custom layout."""
    for name, row in DEPTHS.items():
        if row == (block_name, tuple(num_block)):
            return name
    return None


def resolve_arch(name: str, options: Mapping[str, Any]) -> tuple[str, tuple[int, ...], dict[str, Any]]:
    """A builder name and the user's options -> (block name, blocks per stage, the model's options).

    A variant's row sets its options; a user option that contradicts the row is refused.
    """
    if name not in ARCH_NAMES:
        raise ValueError(f"unknown arch {name!r}; expected one of {', '.join(ARCH_NAMES)}")
    depth, row = VARIANTS.get(name, (name, {}))
    for key, value in row.items():
        if key in options and options[key] != value:
            raise ValueError(f"{name} has {key}={value!r}; got {key}={options[key]!r} (build {depth} to choose it)")
    block_name, num_block = DEPTHS[depth]
    return block_name, num_block, {**options, **row}


def make_divisible(value: float, divisor: int = SE_DIVISOR, round_limit: float = 0.9) -> int:
    """timm's channel rounding: the nearest multiple of divisor (at least divisor), one divisor more when
    that falls below round_limit * value."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * value else rounded


def se_width(channels: int) -> int:
    """The squeeze-and-excitation reduced width of a block with ``channels`` outputs, as timm's SEModule
    rounds it (``round_limit=0``: never a divisor more)."""
    return make_divisible(channels / SE_RATIO, SE_DIVISOR, round_limit=0.0)


def bottleneck_width(planes: int, groups: int, width_per_group: int) -> int:
    """The width of a bottleneck's 3x3 convolution, torchvision's ``int(planes * (base_width / 64.)) * groups``."""
    return int(planes * (width_per_group / BASE_WIDTH)) * groups


def check_block_options(block_name: str, groups: object, width_per_group: object) -> None:
    """Raise ValueError when a BasicBlock is asked for grouped or widened convolutions (torchvision's rule)."""
    if block_name == "BasicBlock" and (groups != 1 or width_per_group != BASE_WIDTH):
        raise ValueError(
            f"BasicBlock only supports groups=1 and width_per_group={BASE_WIDTH}, "
            f"got groups={groups!r} and width_per_group={width_per_group!r}"
        )


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_options(
    block: object,
    num_block: object,
    num_classes: object,
    blocks: dict[str, type],
    *,
    groups: object = 1,
    width_per_group: object = BASE_WIDTH,
    stem: object = DEFAULT_STEM,
    small_stem: object = False,
    avg_down: object = False,
    se: object = False,
) -> None:
    """Raise ValueError with a sentence when ResNet's options cannot build a network."""
    if block not in blocks.values():
        raise ValueError(f"block must be one of {', '.join(blocks)} from the same package, got {block!r}")
    if (
        not isinstance(num_block, (list, tuple))
        or len(num_block) != len(STAGES)
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in num_block)
    ):
        raise ValueError(f"num_block must be {len(STAGES)} positive ints (blocks per stage), got {num_block!r}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not _positive_int(groups):
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if not _positive_int(width_per_group):
        raise ValueError(f"width_per_group must be a positive int, got {width_per_group!r}")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
    if stem == DEEP_STEM and small_stem:
        raise ValueError("stem='deep' and small_stem=True both replace the stem; choose one")
    for name, flag in (("avg_down", avg_down), ("se", se)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    block_name = next(name for name, cls in blocks.items() if cls is block)
    check_block_options(block_name, groups, width_per_group)


# The project's one dtype vocabulary: short name -> the dtype's name in numpy, jax and torch alike
# (``jnp.dtype(name)``, ``getattr(torch, name)``). Every flag and option that takes a dtype uses these.
DTYPES: dict[str, str] = {
    "fp16": "float16",
    "bf16": "bfloat16",
    "fp32": "float32",
    "fp64": "float64",
}

# BatchNorm leaves, torch name -> Flax name. torch's weight/bias are Flax's scale/bias; the running
# statistics live in Flax's ``batch_stats`` collection. num_batches_tracked is torch's counter,
# kept on the Flax side too so round trips lose nothing.
BN_COUNTER = "num_batches_tracked"
BN_PARAMS: dict[str, str] = {"weight": "scale", "bias": "bias"}
BN_STATS: dict[str, str] = {"running_mean": "mean", "running_var": "var", BN_COUNTER: BN_COUNTER}


def dtype_name(short: str) -> str:
    """The dtype name of a short name from DTYPES; ValueError naming the choices otherwise."""
    if short not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {short!r}")
    return DTYPES[short]


# The two Flax APIs the mirror is written in: linen (resnet_flax) and NNX (resnet_flax.nnx), same tree.
LINEN, NNX = "linen", "nnx"
APIS = (LINEN, NNX)


_Model = TypeVar("_Model")


def variant_builder(build: Callable[..., _Model], name: str) -> Callable[..., _Model]:
    """The builder of one ``VARIANTS`` row on a framework's side: ``build(name, **options)``, named and
    documented by its row."""

    def builder(**options: Any) -> _Model:
        return build(name, **options)

    depth, row = VARIANTS[name]
    settings = ", ".join(f"{k}={v!r}" for k, v in row.items())
    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"{name}: {depth} with {settings}."
    return builder
