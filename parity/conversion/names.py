"""The naming rule between checkpoint layouts, the seed's torch keys and Flax variable paths.

Seed key ``conv2_x.0.residual_function.3.weight`` is Flax path
``('conv2_x', '0', 'residual_function', '3', 'kernel')``: the module path is the same, and each
leaf kind has one name and one transform on either side (``parity.conversion.rules``). The other layouts
name the same modules differently, by a rule that holds at every depth: each layout reads a
module name into a ``Site`` (where the module sits in the network) and writes a ``Site`` back.
Leaf names (``weight``, ``running_var``, ...) are the same in every torch layout.

- seed: ``conv1.0``, ``conv2_x.0.residual_function.3``, ``conv2_x.0.shortcut.1``, ``fc``
- torchvision (timm uses the same names): ``conv1``/``bn1``, ``layer1.0.conv2``/``bn2``,
  ``layer1.0.downsample.1``, ``fc``
- transformers (``ResNetForImageClassification``): ``resnet.embedder.embedder.convolution``,
  ``resnet.encoder.stages.0.layers.0.layer.1.normalization``,
  ``resnet.encoder.stages.0.layers.0.shortcut.convolution``, ``classifier.1``
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable

from resnet_arch import HEAD, STAGES, STEM

SEED = "seed"
TORCHVISION = "torchvision"
TIMM = "timm"
TRANSFORMERS = "transformers"
LAYOUTS = (SEED, TORCHVISION, TIMM, TRANSFORMERS)

# The seed's residual_function Sequential: conv j at slot SEQ_SLOTS * j, its BatchNorm at the next
# slot; a ReLU fills the third.
SEQ_SLOTS = 3
# Prefixes that PyTorch wrappers put before every key, and who puts them there.
WRAPPER_PREFIXES = {"module.": "DataParallel/DistributedDataParallel", "_orig_mod.": "torch.compile"}

STEM_PART, BLOCK_PART, SHORTCUT_PART, HEAD_PART = "stem", "block", "shortcut", "head"
_STAGE_NAMES = [name for name, _, _ in STAGES]


@dataclasses.dataclass(frozen=True)
class Site:
    """Where a module sits in the network, in no layout's words."""

    part: str  # STEM_PART, BLOCK_PART, SHORTCUT_PART or HEAD_PART
    norm: bool = False  # the BatchNorm of a convolution + BatchNorm pair, not the convolution
    stage: int = 0  # index into resnet_arch.STAGES (blocks and shortcuts)
    block: int = 0  # block within the stage (blocks and shortcuts)
    conv: int = 0  # convolution of the block's main path (blocks)


_STAGE = "|".join(_STAGE_NAMES)  # a seed stage name
_STAGE_NUMBER = f"[1-{len(STAGES)}]"  # torchvision's layer1..layer4
_STAGE_INDEX = f"[0-{len(STAGES) - 1}]"  # transformers' stages.0..3
_HF_LAYER = {False: "convolution", True: "normalization"}
_HF_HEAD = "classifier.1"  # classifier is Sequential(Flatten, Linear)
_HF_BLOCK = rf"resnet\.encoder\.stages\.({_STAGE_INDEX})\.layers\.(\d+)"  # stage, block

Read = tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], Site | None]], ...]
Write = dict[str, Callable[[Site], str]]


def _seed_slot(m: re.Match[str]) -> Site | None:
    """A slot of the seed's residual_function: a convolution, its BatchNorm, or (None) the ReLU."""
    conv, slot = divmod(int(m[3]), SEQ_SLOTS)
    return Site(BLOCK_PART, slot == 1, _STAGE_NAMES.index(m[1]), int(m[2]), conv) if slot < 2 else None


_SEED_READ: Read = (
    (re.compile(rf"{STEM}\.([01])"), lambda m: Site(STEM_PART, norm=m[1] == "1")),
    (re.compile(rf"({_STAGE})\.(\d+)\.residual_function\.(\d+)"), _seed_slot),
    (
        re.compile(rf"({_STAGE})\.(\d+)\.shortcut\.([01])"),
        lambda m: Site(SHORTCUT_PART, m[3] == "1", _STAGE_NAMES.index(m[1]), int(m[2])),
    ),
    (re.compile(HEAD), lambda m: Site(HEAD_PART)),
)
_SEED_WRITE: Write = {
    STEM_PART: lambda s: f"{STEM}.{int(s.norm)}",
    BLOCK_PART: lambda s: f"{_STAGE_NAMES[s.stage]}.{s.block}.residual_function.{SEQ_SLOTS * s.conv + s.norm}",
    SHORTCUT_PART: lambda s: f"{_STAGE_NAMES[s.stage]}.{s.block}.shortcut.{int(s.norm)}",
    HEAD_PART: lambda s: HEAD,
}

_TV_READ: Read = (
    (re.compile("(conv|bn)1"), lambda m: Site(STEM_PART, norm=m[1] == "bn")),
    (
        re.compile(rf"layer({_STAGE_NUMBER})\.(\d+)\.(conv|bn)([1-9]\d*)"),
        lambda m: Site(BLOCK_PART, m[3] == "bn", int(m[1]) - 1, int(m[2]), int(m[4]) - 1),
    ),
    (
        re.compile(rf"layer({_STAGE_NUMBER})\.(\d+)\.downsample\.([01])"),
        lambda m: Site(SHORTCUT_PART, m[3] == "1", int(m[1]) - 1, int(m[2])),
    ),
    (re.compile("fc"), lambda m: Site(HEAD_PART)),
)
_TV_WRITE: Write = {
    STEM_PART: lambda s: "bn1" if s.norm else "conv1",
    BLOCK_PART: lambda s: f"layer{s.stage + 1}.{s.block}.{'bn' if s.norm else 'conv'}{s.conv + 1}",
    SHORTCUT_PART: lambda s: f"layer{s.stage + 1}.{s.block}.downsample.{int(s.norm)}",
    HEAD_PART: lambda s: "fc",
}

_HF_READ: Read = (
    (
        re.compile(r"resnet\.embedder\.embedder\.(convolution|normalization)"),
        lambda m: Site(STEM_PART, norm=m[1] == _HF_LAYER[True]),
    ),
    (
        re.compile(rf"{_HF_BLOCK}\.layer\.(\d+)\.(convolution|normalization)"),
        lambda m: Site(BLOCK_PART, m[4] == _HF_LAYER[True], int(m[1]), int(m[2]), int(m[3])),
    ),
    (
        re.compile(rf"{_HF_BLOCK}\.shortcut\.(convolution|normalization)"),
        lambda m: Site(SHORTCUT_PART, m[3] == _HF_LAYER[True], int(m[1]), int(m[2])),
    ),
    (re.compile(re.escape(_HF_HEAD)), lambda m: Site(HEAD_PART)),
)
_HF_WRITE: Write = {
    STEM_PART: lambda s: f"resnet.embedder.embedder.{_HF_LAYER[s.norm]}",
    BLOCK_PART: lambda s: f"resnet.encoder.stages.{s.stage}.layers.{s.block}.layer.{s.conv}.{_HF_LAYER[s.norm]}",
    SHORTCUT_PART: lambda s: f"resnet.encoder.stages.{s.stage}.layers.{s.block}.shortcut.{_HF_LAYER[s.norm]}",
    HEAD_PART: lambda s: _HF_HEAD,
}

# Each layout: how its module names read into a Site (full matches, first match wins) and how each
# part of the network is named from one. timm names its ResNet's modules as torchvision does.
_RULES: dict[str, tuple[Read, Write]] = {
    SEED: (_SEED_READ, _SEED_WRITE),
    TORCHVISION: (_TV_READ, _TV_WRITE),
    TIMM: (_TV_READ, _TV_WRITE),
    TRANSFORMERS: (_HF_READ, _HF_WRITE),
}
# The layouts a checkpoint's keys are recognised as (timm's keys are torchvision's), most specific first.
READ_LAYOUTS = (SEED, TORCHVISION, TRANSFORMERS)


def _site(module: str, layout: str) -> Site | None:
    """Where a module of ``layout`` sits, or None when the name is not one of that layout's."""
    for pattern, site in _RULES[layout][0]:
        if m := pattern.fullmatch(module):
            return site(m)
    return None


def check_layout(layout: str) -> None:
    """ValueError naming the choices when ``layout`` is not one of LAYOUTS."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def to_seed(key: str, layout: str) -> str | None:
    """The seed's name of a key in ``layout``, or None when the key is not one of that layout's."""
    module, _, leaf = key.rpartition(".")
    site = _site(module, layout)
    return None if site is None else f"{_SEED_WRITE[site.part](site)}.{leaf}"


def from_seed(key: str, layout: str) -> str:
    """``layout``'s name of a seed key; a key that is not a seed key comes back unchanged."""
    module, _, leaf = key.rpartition(".")
    site = _site(module, SEED)
    return key if site is None else f"{_RULES[layout][1][site.part](site)}.{leaf}"


def recognise(keys: Iterable[str]) -> tuple[str, dict[str, str]]:
    """The layout the keys are written in, and {key: seed key} for every key that layout names.

    Keys no layout names are left out (the caller reports them as unexpected). Raises ValueError
    when some keys are in one layout and some in another, or two keys name the same weight.
    """
    keys = list(keys)
    read = {layout: {k: s for k in keys if (s := to_seed(k, layout)) is not None} for layout in READ_LAYOUTS}
    layout = max(READ_LAYOUTS, key=lambda name: len(read[name]))  # ties: the first, most specific
    renamed = read[layout]
    foreign = {k: other for other in READ_LAYOUTS for k in read[other] if k not in renamed}
    if foreign:
        example, other = next(iter(foreign.items()))
        raise ValueError(
            f"mixed layouts: {len(foreign)} keys in another layout's names (e.g. {example!r}, {other}) among "
            f"{layout} names; a checkpoint holds one layout, so these would overwrite or shadow weights: "
            + ", ".join(foreign)
        )
    seen: dict[str, str] = {}
    for key, seed_key in renamed.items():
        if seed_key in seen:
            raise ValueError(f"keys {seen[seed_key]!r} and {key!r} both name the weight {seed_key!r}")
        seen[seed_key] = key
    return layout, renamed


# --- variants this model is not, recognised by their key names ---------------------------------

_DEEP_STEM = re.compile(r"^conv1\.([2-9]|\d\d+)\.weight$")  # the seed's stem has slots 0, 1 only
_AVG_DOWN = re.compile(r"^layer\d+\.\d+\.downsample\.2\.")  # AvgPool, then conv and BatchNorm
_TV_BLOCK_MODULE = re.compile(r"^layer\d+\.\d+\.(\w+)\.")
_TV_BLOCK_MODULES = re.compile(r"^(conv\d+|bn\d+|downsample)$")
# Known extra block modules and what they are.
_EXTRA_MODULES = {"se": "squeeze-and-excitation or ECA attention: timm seresnet*, ecaresnet*"}


def variant_features(keys: Iterable[str]) -> list[str]:
    """What the key names show that this model does not have, one phrase each (empty: nothing)."""
    keys = list(keys)
    features = []
    if any(_DEEP_STEM.match(k) for k in keys):
        features.append("a deep stem of stacked 3x3 convolutions (ResNet-C/D/S/T: timm resnet50c, resnet50d, ...)")
    if any(_AVG_DOWN.match(k) for k in keys):
        features.append("an average-pool shortcut (ResNet-D: timm resnet50d, ...)")
    extra = sorted({m[1] for k in keys if (m := _TV_BLOCK_MODULE.match(k)) and not _TV_BLOCK_MODULES.match(m[1])})
    if extra:
        named = [f"{name} ({_EXTRA_MODULES[name]})" if name in _EXTRA_MODULES else name for name in extra]
        features.append(f"extra modules in the blocks: {', '.join(named)}")
    if any(k.startswith("embedder.embedder.") for k in keys):
        features.append(
            "no classifier (a transformers ResNetModel is the backbone alone; convert a ResNetForImageClassification)"
        )
    return features
