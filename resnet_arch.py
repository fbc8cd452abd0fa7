"""The architecture table that both frameworks build from, and the names both sides share.

This module imports no framework: ``resnet_torch`` and ``resnet_flax`` each import it and their
own framework only.
"""

from __future__ import annotations

# depth name -> (block class name, blocks per stage); block names resolve in each framework.
DEPTHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("BasicBlock", (2, 2, 2, 2)),
    "resnet34": ("BasicBlock", (3, 4, 6, 3)),
    "resnet50": ("BottleNeck", (3, 4, 6, 3)),
    "resnet101": ("BottleNeck", (3, 4, 23, 3)),
    "resnet152": ("BottleNeck", (3, 8, 36, 3)),
}

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

STEM_WIDTH = 64
IN_CHANNELS = 3


def arch_name(block_name: str, num_block: tuple[int, ...]) -> str | None:
    """The depth name of a (block, stage sizes) pair, or None for a custom layout."""
    for name, row in DEPTHS.items():
        if row == (block_name, tuple(num_block)):
            return name
    return None


def check_options(block: object, num_block: object, num_classes: object, blocks: dict[str, type]) -> None:
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
