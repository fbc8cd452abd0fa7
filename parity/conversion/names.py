"""The naming rule between checkpoint layouts, the seed's torch keys and Flax variable paths.

Seed key ``conv2_x.0.residual_function.3.weight`` is Flax path
``('conv2_x', '0', 'residual_function', '3', 'kernel')``: the module path is the same, and each
leaf kind has one name and one transform on either side (``parity.conversion.rules``). The other layouts
name the same modules differently, by a rule that holds at every depth and for every option: each
layout reads a module name into a ``Site`` (where the module sits in the network) and writes a
``Site`` back. Leaf names (``weight``, ``running_var``, ...) are the same in every torch layout.

- seed: ``conv1.0`` (a deep stem: ``conv1.0``, ``conv1.1``, ``conv1.3`` .. ``conv1.7``),
  ``conv2_x.0.residual_function.3``, ``conv2_x.0.shortcut.1`` (average-pool shortcut: ``shortcut.1``,
  ``shortcut.2``), ``conv2_x.0.se.fc1``, ``fc``
- torchvision (timm uses the same names): ``conv1``/``bn1`` (timm's deep stem: ``conv1.0``, ``conv1.1``,
  ``conv1.3``, ``conv1.4``, ``conv1.6``, ``bn1``), ``layer1.0.conv2``/``bn2``, ``layer1.0.downsample.1``,
  ``layer1.0.se.fc1``, ``fc``
- transformers (``ResNetForImageClassification``): ``resnet.embedder.embedder.convolution``,
  ``resnet.encoder.stages.0.layers.0.layer.1.normalization``,
  ``resnet.encoder.stages.0.layers.0.shortcut.convolution``, ``classifier.1``; it has no name for a
  deep stem's second and third convolutions, an average-pool shortcut's or a squeeze-and-excitation
  module (``ResNetConfig`` builds none of them).

Only the stem's names depend on more than the name: torchvision's ``bn1`` is the BatchNorm of the
stem's last convolution, and its ``conv1`` the stem's only one; so reading and writing take the
number of stem convolutions (``stem_convs``, read from the keys by ``count_stem_convs``).
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

# The seed's Sequentials (stem and residual_function): conv j at slot SEQ_SLOTS * j, its BatchNorm at
# the next slot; a ReLU fills the third.
SEQ_SLOTS = 3
# Prefixes that PyTorch wrappers put before every key, and who puts them there.
WRAPPER_PREFIXES = {"module.": "DataParallel/DistributedDataParallel", "_orig_mod.": "torch.compile"}

STEM_PART, BLOCK_PART, SHORTCUT_PART, SE_PART, HEAD_PART = "stem", "block", "shortcut", "se", "head"
_STAGE_NAMES = [name for name, _, _ in STAGES]


@dataclasses.dataclass(frozen=True)
class Site:
    """Where a module sits in the network, in no layout's words."""

    part: str  # STEM_PART, BLOCK_PART, SHORTCUT_PART, SE_PART or HEAD_PART
    stage: int = 0  # index into resnet_arch.STAGES (blocks, shortcuts, squeeze-and-excitation)
    block: int = 0  # block within the stage
    slot: int = 0  # the module's index in the seed's Sequential (stem, block, shortcut); SE: 1 for fc1, 2 for fc2

    @property
    def conv(self) -> int:
        """Which convolution of a stem or block (slot SEQ_SLOTS * conv, its BatchNorm the next slot)."""
        return self.slot // SEQ_SLOTS

    @property
    def norm(self) -> bool:
        """The BatchNorm of a convolution + BatchNorm pair of a stem or block, not the convolution."""
        return self.slot % SEQ_SLOTS == 1


_STAGE = "|".join(_STAGE_NAMES)  # a seed stage name
_STAGE_NUMBER = f"[1-{len(STAGES)}]"  # torchvision's layer1..layer4
_STAGE_INDEX = f"[0-{len(STAGES) - 1}]"  # transformers' stages.0..3
_HF_LAYER = {False: "convolution", True: "normalization"}
_HF_HEAD = "classifier.1"  # classifier is Sequential(Flatten, Linear)
_HF_BLOCK = rf"resnet\.encoder\.stages\.({_STAGE_INDEX})\.layers\.(\d+)"  # stage, block
_HF_SHORTCUT = {False: 0, True: 1}  # transformers' shortcut (convolution, normalization): seed slots 0, 1

# A layout's reading of one module name (a full match, the number of stem convolutions) into a Site, or None.
Read = tuple[tuple[re.Pattern[str], Callable[[re.Match[str], int], Site | None]], ...]
# A layout's name of a Site (given the number of stem convolutions), per part; None where it has none.
Write = dict[str, Callable[[Site, int], str | None]]


def _pair_slot(slot: int) -> int | None:
    """A seed Sequential slot that holds weights (a convolution or its BatchNorm), or None for the ReLU."""
    return slot if slot % SEQ_SLOTS < 2 else None


def _seed_site(part: str, m: re.Match[str], slot: int | None) -> Site | None:
    return None if slot is None else Site(part, _STAGE_NAMES.index(m[1]), int(m[2]), slot)


def _stem_slot(m: re.Match[str], stem_convs: int) -> Site | None:
    slot = _pair_slot(int(m[1]))
    return None if slot is None else Site(STEM_PART, slot=slot)


_SEED_READ: Read = (
    (re.compile(rf"{STEM}\.(\d+)"), _stem_slot),
    (
        re.compile(rf"({_STAGE})\.(\d+)\.residual_function\.(\d+)"),
        lambda m, n: _seed_site(BLOCK_PART, m, _pair_slot(int(m[3]))),
    ),
    (re.compile(rf"({_STAGE})\.(\d+)\.shortcut\.(\d+)"), lambda m, n: _seed_site(SHORTCUT_PART, m, int(m[3]))),
    (re.compile(rf"({_STAGE})\.(\d+)\.se\.fc([12])"), lambda m, n: _seed_site(SE_PART, m, int(m[3]))),
    (re.compile(HEAD), lambda m, n: Site(HEAD_PART)),
)
_SEED_WRITE: Write = {
    STEM_PART: lambda s, n: f"{STEM}.{s.slot}",
    BLOCK_PART: lambda s, n: f"{_STAGE_NAMES[s.stage]}.{s.block}.residual_function.{s.slot}",
    SHORTCUT_PART: lambda s, n: f"{_STAGE_NAMES[s.stage]}.{s.block}.shortcut.{s.slot}",
    SE_PART: lambda s, n: f"{_STAGE_NAMES[s.stage]}.{s.block}.se.fc{s.slot}",
    HEAD_PART: lambda s, n: HEAD,
}


def _tv_stem(s: Site, stem_convs: int) -> str:
    """torchvision's (and timm's) stem: ``conv1``/``bn1``, or timm's deep ``conv1.N`` with ``bn1`` last."""
    if s.norm and s.conv == stem_convs - 1:
        return "bn1"
    return "conv1" if stem_convs == 1 else f"conv1.{s.slot}"


def _tv_block(s: Site, stem_convs: int) -> str:
    return f"layer{s.stage + 1}.{s.block}.{'bn' if s.norm else 'conv'}{s.conv + 1}"


_TV_READ: Read = (
    (re.compile("conv1"), lambda m, n: Site(STEM_PART)),
    (re.compile("bn1"), lambda m, n: Site(STEM_PART, slot=SEQ_SLOTS * (n - 1) + 1)),
    (re.compile(r"conv1\.(\d+)"), _stem_slot),
    (
        re.compile(rf"layer({_STAGE_NUMBER})\.(\d+)\.(conv|bn)([1-9]\d*)"),
        lambda m, n: Site(BLOCK_PART, int(m[1]) - 1, int(m[2]), SEQ_SLOTS * (int(m[4]) - 1) + (m[3] == "bn")),
    ),
    (
        re.compile(rf"layer({_STAGE_NUMBER})\.(\d+)\.downsample\.(\d+)"),
        lambda m, n: Site(SHORTCUT_PART, int(m[1]) - 1, int(m[2]), int(m[3])),
    ),
    (
        re.compile(rf"layer({_STAGE_NUMBER})\.(\d+)\.se\.fc([12])"),
        lambda m, n: Site(SE_PART, int(m[1]) - 1, int(m[2]), int(m[3])),
    ),
    (re.compile("fc"), lambda m, n: Site(HEAD_PART)),
)
_TV_WRITE: Write = {
    STEM_PART: _tv_stem,
    BLOCK_PART: _tv_block,
    SHORTCUT_PART: lambda s, n: f"layer{s.stage + 1}.{s.block}.downsample.{s.slot}",
    SE_PART: lambda s, n: f"layer{s.stage + 1}.{s.block}.se.fc{s.slot}",
    HEAD_PART: lambda s, n: "fc",
}

_HF_READ: Read = (
    (
        re.compile(r"resnet\.embedder\.embedder\.(convolution|normalization)"),
        lambda m, n: Site(STEM_PART, slot=int(m[1] == _HF_LAYER[True])),
    ),
    (
        re.compile(rf"{_HF_BLOCK}\.layer\.(\d+)\.(convolution|normalization)"),
        lambda m, n: Site(BLOCK_PART, int(m[1]), int(m[2]), SEQ_SLOTS * int(m[3]) + (m[4] == _HF_LAYER[True])),
    ),
    (
        re.compile(rf"{_HF_BLOCK}\.shortcut\.(convolution|normalization)"),
        lambda m, n: Site(SHORTCUT_PART, int(m[1]), int(m[2]), _HF_SHORTCUT[m[3] == _HF_LAYER[True]]),
    ),
    (re.compile(re.escape(_HF_HEAD)), lambda m, n: Site(HEAD_PART)),
)
_HF_SHORTCUT_NAMES = {slot: _HF_LAYER[norm] for norm, slot in _HF_SHORTCUT.items()}
_HF_WRITE: Write = {
    STEM_PART: lambda s, n: f"resnet.embedder.embedder.{_HF_LAYER[s.norm]}" if s.slot < SEQ_SLOTS else None,
    BLOCK_PART: lambda s, n: f"resnet.encoder.stages.{s.stage}.layers.{s.block}.layer.{s.conv}.{_HF_LAYER[s.norm]}",
    SHORTCUT_PART: lambda s, n: (
        f"resnet.encoder.stages.{s.stage}.layers.{s.block}.shortcut.{_HF_SHORTCUT_NAMES[s.slot]}"
        if s.slot in _HF_SHORTCUT_NAMES
        else None
    ),
    HEAD_PART: lambda s, n: _HF_HEAD,
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
# A stem Sequential's weighted slots, in the seed's and timm's deep-stem names alike (``conv1.6.weight``).
_STEM_SLOT_KEY = re.compile(rf"^{STEM}\.(\d+)\.")


def count_stem_convs(keys: Iterable[str]) -> int:
    """The number of stem convolutions that seed keys, or timm's, show (``conv1.6.weight``: 3; none: 1)."""
    return max((int(m[1]) // SEQ_SLOTS + 1 for k in keys if (m := _STEM_SLOT_KEY.match(k))), default=1)


def _site(module: str, layout: str, stem_convs: int) -> Site | None:
    """Where a module of ``layout`` sits, or None when the name is not one of that layout's."""
    for pattern, site in _RULES[layout][0]:
        if m := pattern.fullmatch(module):
            return site(m, stem_convs)
    return None


def check_layout(layout: str) -> None:
    """ValueError naming the choices when ``layout`` is not one of LAYOUTS."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def to_seed(key: str, layout: str, stem_convs: int = 1) -> str | None:
    """The seed's name of a key in ``layout``, or None when the key is not one of that layout's."""
    module, _, leaf = key.rpartition(".")
    site = _site(module, layout, stem_convs)
    return None if site is None else f"{_SEED_WRITE[site.part](site, stem_convs)}.{leaf}"


def from_seed(key: str, layout: str, stem_convs: int = 1) -> str:
    """``layout``'s name of a seed key; a key that is not a seed key, or that the layout has no name for
    (a deep stem's or a squeeze-and-excitation module's in transformers' names), comes back unchanged."""
    module, _, leaf = key.rpartition(".")
    site = _site(module, SEED, stem_convs)
    write = None if site is None else _RULES[layout][1].get(site.part)
    name = None if site is None or write is None else write(site, stem_convs)
    return key if name is None else f"{name}.{leaf}"


def recognise(keys: Iterable[str]) -> tuple[str, dict[str, str]]:
    """The layout the keys are written in, and {key: seed key} for every key that layout names.

    Keys no layout names are left out (the caller reports them as unexpected). Raises ValueError
    when some keys are in one layout and some in another, or two keys name the same weight.
    """
    keys = list(keys)
    stem_convs = count_stem_convs(keys)
    read = {
        layout: {k: s for k in keys if (s := to_seed(k, layout, stem_convs)) is not None} for layout in READ_LAYOUTS
    }
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

_TV_BLOCK_MODULE = re.compile(r"^layer\d+\.\d+\.(\w+)\.")
# Known extra block modules and what they are.
_EXTRA_MODULES = {"se": "attention other than squeeze-and-excitation's fc1/fc2: timm ecaresnet*, cbam"}


def variant_features(keys: Iterable[str]) -> list[str]:
    """What the key names show that this model does not have, one phrase each (empty: nothing)."""
    keys = list(keys)
    features = []
    stem_convs = count_stem_convs(keys)
    extra = sorted(
        {m[1] for k in keys if (m := _TV_BLOCK_MODULE.match(k)) and to_seed(k, TORCHVISION, stem_convs) is None}
    )
    if extra:
        named = [f"{name} ({_EXTRA_MODULES[name]})" if name in _EXTRA_MODULES else name for name in extra]
        features.append(f"extra modules in the blocks: {', '.join(named)}")
    if any(k.startswith("embedder.embedder.") for k in keys):
        features.append(
            "no classifier (a transformers ResNetModel is the backbone alone; convert a ResNetForImageClassification)"
        )
    return features
