"""Read the architecture (block type, stage sizes, classes, stem, the family's options) back from keys and shapes.

The family's options (``resnet_arch.FAMILY_OPTIONS``) show in the shapes and names alone: groups and
width per group in the grouped 3x3 convolution's weight, the deep stem in its second convolution
(``conv1.3``), the average-pool shortcut in its slots (``shortcut.1``, ``shortcut.2``), squeeze-and-
excitation in its ``se.fc1``/``se.fc2`` modules; a network is named by its builder name when it is a
row of ``resnet_arch.VARIANTS`` (or a plain depth), "custom" otherwise. Also what the model hubs'
configs say about a network: a transformers ``ResNetConfig`` or a timm architecture name is checked
against what this model can be, and written for a spec.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from resnet_arch import (
    BASE_WIDTH,
    BN_COUNTER,
    BN_PARAMS,
    BN_STATS,
    DEEP_STEM,
    DEEP_STEM_CONVS,
    DEFAULT_STEM,
    FAMILY_OPTIONS,
    HEAD,
    IN_CHANNELS,
    STAGES,
    STEM,
    STEM_WIDTH,
    VARIANTS,
    arch_name,
    bottleneck_width,
    se_width,
)

from .names import SEQ_SLOTS, TIMM, TORCHVISION, TRANSFORMERS

# The layouts whose own model (what each loads into) has only the 7x7 stem: a small stem cannot go there.
STEM_ONLY_MODELS = {
    TORCHVISION: "torchvision.models.resnetNN",
    TIMM: "timm's resnetNN",
    TRANSFORMERS: "transformers' ResNetForImageClassification",
}
# The family options torchvision's ResNet builds (resnext*, wide_resnet*); the others are timm's alone.
TORCHVISION_OPTIONS = ("groups", "width_per_group")

# Per block type, each convolution of residual_function in order: (kernel size, output width as a
# multiple of the stage width; the last one's factor is the block's expansion). Conv j sits at slot
# SEQ_SLOTS * j of the block's Sequential, its BatchNorm at the next slot. A bottleneck's first two
# convolutions are ``bottleneck_width`` wide instead, and its 3x3 (GROUPED_CONV) is the grouped one.
BLOCK_CONVS: dict[str, tuple[tuple[int, int], ...]] = {
    "BasicBlock": ((3, 1), (3, 1)),
    "BottleNeck": ((1, 1), (3, 1), (1, 4)),
}
GROUPED_CONV = 1  # the bottleneck's 3x3 convolution, the only grouped one (torchvision's rule)
_STEM_KERNEL = {False: 7, True: 3}  # small_stem -> stem kernel size
_BN_LEAVES = (*BN_PARAMS, *BN_STATS)  # in the order torch's BatchNorm2d registers them
# The shortcut's convolution slot: 0 plain (conv, BatchNorm), 1 behind the average pool (pool, conv, BatchNorm).
_SHORTCUT_CONV = {False: 0, True: 1}
# Squeeze-and-excitation's two 1x1 convolutions with bias: the reduction (fc1) and the expansion (fc2).
_SE_CONVS = ("fc1", "fc2")

_BLOCK_KEY = re.compile(r"^(\w+)\.(\d+)\.residual_function\.(\d+)\.")
_AVG_DOWN_KEY = re.compile(rf"^\w+\.\d+\.shortcut\.{_SHORTCUT_CONV[True] + 1}\.")
_SE_KEY = re.compile(r"^\w+\.\d+\.se\.")
_TRANSFORMERS_LAYER_TYPES = {"BasicBlock": "basic", "BottleNeck": "bottleneck"}
# What transformers' ResNetConfig builds for a field its config.json leaves out.
_TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "num_channels": 3,
    "embedding_size": 64,
    "hidden_sizes": [256, 512, 1024, 2048],
    "depths": [3, 4, 6, 3],
    "layer_type": "bottleneck",
    "hidden_act": "relu",
    "downsample_in_first_stage": False,
    "downsample_in_bottleneck": False,
}
# timm's plain ResNets are resnet<depth>; any suffix (resnet50d, resnetblur50, resnet50_gn) is a variant.
_TIMM_PLAIN = re.compile(r"^resnet\d+$")


class NotThisArchitecture(ValueError):
    """A checkpoint of a ResNet variant that this model cannot represent; the message names the feature."""


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """What builds a model that fits a checkpoint, in either framework."""

    block: str
    num_block: tuple[int, ...]
    num_classes: int
    small_stem: bool
    groups: int = 1
    width_per_group: int = BASE_WIDTH
    stem: str = DEFAULT_STEM
    avg_down: bool = False
    se: bool = False

    def options(self) -> dict[str, Any]:
        """The family's options (``resnet_arch.FAMILY_OPTIONS``) this spec has."""
        return {k: getattr(self, k) for k in FAMILY_OPTIONS}

    def variant_options(self) -> dict[str, Any]:
        """The family's options where this spec is not the plain ResNet."""
        return {k: v for k, v in self.options().items() if v != FAMILY_OPTIONS[k]}

    @property
    def name(self) -> str | None:
        """The builder name ('resnet50', 'resnext50_32x4d', ...), or None for a network no builder makes."""
        depth = arch_name(self.block, self.num_block)
        variant = self.variant_options()
        if depth is None or not variant:
            return depth
        return next((name for name, (d, row) in VARIANTS.items() if d == depth and row == variant), None)

    def describe(self) -> str:
        """A one-line description, e.g. 'resnext50_32x4d (BottleNeck [3, 4, 6, 3], groups=32,
        width_per_group=4, 1000 classes)'."""
        options = "".join(f", {k}={v!r}" for k, v in self.variant_options().items())
        stem = ", small stem" if self.small_stem else ""
        return (
            f"{self.name or 'custom'} ({self.block} {list(self.num_block)}{options}, {self.num_classes} classes{stem})"
        )

    def stage_widths(self) -> list[int]:
        """Each stage's output width (transformers' hidden_sizes)."""
        expansion = BLOCK_CONVS[self.block][-1][1]
        return [width * expansion for _, width, _ in STAGES]

    def block_convs(self, planes: int) -> list[tuple[int, int, int]]:
        """(kernel size, output width, groups) of each convolution of a block of a stage ``planes`` wide."""
        convs = BLOCK_CONVS[self.block]
        if self.block == "BasicBlock":  # groups 1 and the base width only, as torchvision's
            return [(k, planes * factor, 1) for k, factor in convs]
        inner = bottleneck_width(planes, self.groups, self.width_per_group)
        last = len(convs) - 1
        return [
            (k, planes * factor if j == last else inner, self.groups if j == GROUPED_CONV else 1)
            for j, (k, factor) in enumerate(convs)
        ]

    def torch_shapes(self) -> dict[str, tuple[int, ...]]:
        """{seed state-dict key: torch shape}, in the order resnet_torch registers them."""
        shapes: dict[str, tuple[int, ...]] = {}

        def conv_bn(conv: str, bn: str, c_in: int, c_out: int, k: int) -> None:
            shapes[f"{conv}.weight"] = (c_out, c_in, k, k)
            shapes.update({f"{bn}.{leaf}": () if leaf == BN_COUNTER else (c_out,) for leaf in _BN_LEAVES})

        if self.stem == DEEP_STEM:
            for j, (c_in, c_out, _) in enumerate(DEEP_STEM_CONVS):
                conv_bn(f"{STEM}.{SEQ_SLOTS * j}", f"{STEM}.{SEQ_SLOTS * j + 1}", c_in, c_out, 3)
        else:
            conv_bn(f"{STEM}.0", f"{STEM}.1", IN_CHANNELS, STEM_WIDTH, _STEM_KERNEL[self.small_stem])
        c_in = STEM_WIDTH
        for (stage, width, stride), blocks in zip(STAGES, self.num_block, strict=True):
            for i in range(blocks):
                prefix, c = f"{stage}.{i}", c_in
                for j, (k, c_out, groups) in enumerate(self.block_convs(width)):
                    slot = f"{prefix}.residual_function.{SEQ_SLOTS * j}"
                    conv_bn(slot, f"{prefix}.residual_function.{SEQ_SLOTS * j + 1}", c // groups, c_out, k)
                    c = c_out
                if self.se:
                    rd = se_width(c)
                    for fc, (c_from, c_to) in zip(_SE_CONVS, ((c, rd), (rd, c)), strict=True):
                        shapes[f"{prefix}.se.{fc}.weight"] = (c_to, c_from, 1, 1)
                        shapes[f"{prefix}.se.{fc}.bias"] = (c_to,)
                # Projection shortcut exactly when the block changes the shape (resnet_torch's _shortcut).
                if (stride if i == 0 else 1) != 1 or c_in != c:
                    at = _SHORTCUT_CONV[self.avg_down]
                    conv_bn(f"{prefix}.shortcut.{at}", f"{prefix}.shortcut.{at + 1}", c_in, c, 1)
                c_in = c
        shapes[f"{HEAD}.weight"] = (self.num_classes, c_in)
        shapes[f"{HEAD}.bias"] = (self.num_classes,)
        return shapes

    @classmethod
    def of_flax_model(cls, model: Any) -> ArchSpec:
        """The spec of a resnet_flax.ResNet, read from its fields (no tracing, no init)."""
        import resnet_flax

        if not isinstance(model, resnet_flax.ResNet):
            raise TypeError(f"target must be a resnet_flax.ResNet, got {type(model).__name__}")
        return cls.of_model(model)

    @classmethod
    def of_model(cls, model: Any) -> ArchSpec:
        """The spec of a resnet_torch, resnet_flax or resnet_flax.nnx ResNet, read from its options."""
        options = {k: getattr(model, k) for k in FAMILY_OPTIONS}
        return cls(model.block.__name__, tuple(model.num_block), model.num_classes, model.small_stem, **options)

    def model_kwargs(self) -> dict[str, Any]:
        """The builder options this spec fixes."""
        return dict(num_classes=self.num_classes, small_stem=self.small_stem, **self.options())

    def torch_model(self, **kwargs: Any) -> Any:
        """An uninitialized-looking resnet_torch.ResNet of this shape (init_weights off: weights come next)."""
        import resnet_torch

        block = resnet_torch.model.BLOCKS[self.block]
        return resnet_torch.ResNet(block, list(self.num_block), init_weights=False, **self.model_kwargs(), **kwargs)

    def flax_model(self, **kwargs: Any) -> Any:
        """A resnet_flax.ResNet of this shape."""
        import resnet_flax

        block = resnet_flax.model.BLOCKS[self.block]
        return resnet_flax.ResNet(block, tuple(self.num_block), **self.model_kwargs(), **kwargs)

    def check_layout(self, layout: str) -> None:
        """ValueError when the layout's own model cannot be this network."""
        if layout == TRANSFORMERS and (variant := self.variant_options()):
            options = ", ".join(f"{k}={v!r}" for k, v in variant.items())
            raise ValueError(
                f"{self.name or 'a network'} ({options}) has no transformers layout: transformers' ResNet has no "
                "grouped or widened convolutions, deep stem, average-pool shortcut or squeeze-and-excitation "
                "(write it in the torchvision or timm layout)"
            )
        if layout == TORCHVISION and (variant := self._torchvision_lacks()):
            options = ", ".join(f"{k}={v!r}" for k, v in variant.items())
            raise ValueError(
                f"{self.name or 'a network'} ({options}) has no torchvision layout: torchvision's ResNet has no "
                "deep stem, average-pool shortcut or squeeze-and-excitation (write it in the timm layout)"
            )
        if layout in STEM_ONLY_MODELS and self.small_stem:
            raise ValueError(
                f"a small stem (3x3/1, no max-pool) has no {layout} equivalent: {STEM_ONLY_MODELS[layout]}'s stem is "
                f"always a 7x7/2 convolution and a max-pool (train with --no-small-stem for a {layout} export)"
            )

    def _torchvision_lacks(self) -> dict[str, Any]:
        """The variant options torchvision's ResNet builds none of (it has groups and widths only)."""
        return {k: v for k, v in self.variant_options().items() if k not in TORCHVISION_OPTIONS}

    def hub_config(self, layout: str) -> dict[str, Any] | None:
        """The config.json a model hub's loader builds this network from, or None where the layout has none.

        transformers: a ``ResNetConfig`` for ``ResNetForImageClassification.from_pretrained``;
        timm: the architecture name for ``timm.create_model("local-dir:DIR", pretrained=True)``.
        """
        self.check_layout(layout)
        if layout == TRANSFORMERS:
            labels = {str(i): f"LABEL_{i}" for i in range(self.num_classes)}
            return {
                "architectures": ["ResNetForImageClassification"],
                "model_type": "resnet",
                **_TRANSFORMERS_DEFAULTS,  # ReLU, the stride on the 3x3, a first stage without stride
                "num_channels": IN_CHANNELS,
                "embedding_size": STEM_WIDTH,
                "hidden_sizes": self.stage_widths(),
                "depths": list(self.num_block),
                "layer_type": _TRANSFORMERS_LAYER_TYPES[self.block],
                "id2label": labels,
                "label2id": {name: int(i) for i, name in labels.items()},
            }
        if layout == TIMM:
            if self.name is None or self.small_stem:
                raise ValueError(
                    f"timm has no architecture for {self.describe()}: a timm directory needs one of its "
                    "resnet18..152 (7x7 stem) or the family's builders (resnext50_32x4d, resnet50d, seresnet50, ...)"
                )
            return {
                "architecture": self.name,
                "num_classes": self.num_classes,
                "num_features": self.stage_widths()[-1],
                "pretrained_cfg": {"num_classes": self.num_classes, "first_conv": "conv1", "classifier": "fc"},
            }
        return None


def _variant_shapes(shapes: Mapping[str, Sequence[int]], block: str, deep_stem: bool) -> list[str]:
    """Features of a ResNet variant that the convolution shapes show, one phrase each.

    A bottleneck's groups and width per group are read from its shapes (``_bottleneck_options``), not
    refused; a BasicBlock has neither (torchvision's rule), so grouped or other widths are named here.
    """
    features = []
    stem = shapes.get(f"{STEM}.0.weight")
    if stem is not None and len(stem) == 4 and not deep_stem:
        if stem[1] != IN_CHANNELS:
            features.append(f"{stem[1]} input channels (this model takes {IN_CHANNELS})")
        if stem[0] != STEM_WIDTH:
            features.append(
                f"a stem {stem[0]} channels wide (transformers embedding_size; this model's is {STEM_WIDTH})"
            )
    if block != "BasicBlock":
        return features
    got, expected, groups = [], [], set()
    for name, width, _ in STAGES:
        widths: list[int] = []
        for j in range(len(BLOCK_CONVS[block])):
            conv = shapes.get(f"{name}.0.residual_function.{SEQ_SLOTS * j}.weight")
            if conv is None or len(conv) != 4:
                return features
            if widths and conv[1] != widths[-1] and widths[-1] % conv[1] == 0:
                groups.add(widths[-1] // conv[1])
            widths.append(conv[0])
        got.append("-".join(map(str, widths)))
        expected.append("-".join(str(width * factor) for _, factor in BLOCK_CONVS[block]))
    if groups:
        features.append(f"grouped convolutions in a BasicBlock ({'/'.join(map(str, sorted(groups)))} groups)")
    if got != expected:
        features.append(
            f"convolution widths {', '.join(got)} in the stages' first blocks where this model has "
            f"{', '.join(expected)} (wide BasicBlocks, or other transformers hidden_sizes)"
        )
    return features


def _bottleneck_options(shapes: Mapping[str, Sequence[int]]) -> tuple[int, int]:
    """(groups, width per group) from the first bottleneck's grouped 3x3 convolution, (width, width / groups,
    3, 3) in torch axes; the first stage is BASE_WIDTH planes wide, so its width is width_per_group * groups."""
    conv = shapes.get(f"{STAGES[0][0]}.0.residual_function.{SEQ_SLOTS * GROUPED_CONV}.weight")
    if conv is None or len(conv) != 4 or not conv[1] or conv[0] % conv[1]:
        return 1, BASE_WIDTH  # the shape check names what is wrong
    groups = conv[0] // conv[1]
    return groups, conv[0] * BASE_WIDTH // (STAGES[0][1] * groups)


def not_this_architecture(features: Sequence[str]) -> NotThisArchitecture:
    """The error for a checkpoint whose features (phrases) this model does not have."""
    return NotThisArchitecture(
        f"{' and '.join(features)}: not this architecture (the ResNet family: a 7x7, 3x3 or deep 3x3 stem, "
        "convolution + BatchNorm blocks with the stride on the 3x3 convolution, 1x1 projection shortcuts behind "
        "an optional average pool, optional squeeze-and-excitation)"
    )


def infer_arch(shapes: Mapping[str, Sequence[int]]) -> ArchSpec:
    """The architecture of a checkpoint from its seed-layout keys and torch shapes.

    Raises ValueError naming what is missing when the keys do not describe a ResNet, and
    NotThisArchitecture naming the feature when they describe a ResNet variant this model is not.
    """
    stage_names = [name for name, _, _ in STAGES]
    blocks: dict[str, int] = {}
    last_slot = 0
    for key in shapes:
        if (m := _BLOCK_KEY.match(key)) and m[1] in stage_names:
            blocks[m[1]] = max(blocks.get(m[1], 0), int(m[2]) + 1)
            last_slot = max(last_slot, int(m[3]))
    convs = last_slot // SEQ_SLOTS + 1
    block = next((name for name, layers in BLOCK_CONVS.items() if len(layers) == convs), None)
    # The deep stem's second convolution: the plain stem has one.
    deep_stem = f"{STEM}.{SEQ_SLOTS}.weight" in shapes
    if block is not None and (features := _variant_shapes(shapes, block, deep_stem)):
        raise not_this_architecture(features)
    stem, fc = shapes.get(f"{STEM}.0.weight"), shapes.get(f"{HEAD}.weight")
    kernel = int(stem[-1]) if stem and len(stem) == 4 else None
    # A deep stem's 3x3 convolutions are no small stem (the shape check names a wrong kernel).
    small_stem = None if kernel is None else False if deep_stem else {k: s for s, k in _STEM_KERNEL.items()}.get(kernel)
    problems = []
    if small_stem is None:
        problems.append(f"{STEM}.0.weight (the stem convolution, 7x7 or 3x3)")
    if fc is None or len(fc) != 2:
        problems.append(f"{HEAD}.weight (the classifier; a backbone without one does not convert)")
    missing_stages = [name for name in stage_names if name not in blocks]
    if missing_stages:
        problems.append("blocks of " + ", ".join(missing_stages))
    elif block is None:
        problems.append(f"a block type with {convs} convolutions (BasicBlock has 2, BottleNeck 3)")
    if problems or block is None or small_stem is None or fc is None:
        raise ValueError("cannot read a ResNet architecture from these keys: missing " + "; ".join(problems))
    groups, width_per_group = _bottleneck_options(shapes) if block != "BasicBlock" else (1, BASE_WIDTH)
    return ArchSpec(
        block=block,
        num_block=tuple(blocks[name] for name in stage_names),
        num_classes=int(fc[0]),
        small_stem=small_stem,
        stem=DEEP_STEM if deep_stem else DEFAULT_STEM,
        avg_down=any(_AVG_DOWN_KEY.match(k) for k in shapes),
        se=any(_SE_KEY.match(k) for k in shapes),
        groups=groups,
        width_per_group=width_per_group,
    )


def _transformers_features(config: Mapping[str, Any], spec: ArchSpec) -> list[str]:
    """What a transformers ResNetConfig asks for that this model (as ``spec``) is not."""
    cfg = {**_TRANSFORMERS_DEFAULTS, **config}
    features = []
    if cfg["hidden_act"] != "relu":
        features.append(f"activation {cfg['hidden_act']!r} (hidden_act; this model uses ReLU)")
    if cfg["downsample_in_first_stage"]:
        features.append("a strided first stage (downsample_in_first_stage=True; this model's keeps the resolution)")
    if cfg["downsample_in_bottleneck"] and cfg["layer_type"] == "bottleneck":
        # The stride on the first 1x1 convolution (ResNet v1) drops pixels the 3x3 would have seen:
        # not the function of the stride on the 3x3 (v1.5), whatever the weights.
        features.append(
            "the stride on the first 1x1 convolution of a bottleneck (downsample_in_bottleneck=True, ResNet v1; "
            "this model strides the 3x3, v1.5)"
        )
    weights = {
        "num_channels": IN_CHANNELS,
        "embedding_size": STEM_WIDTH,
        "layer_type": _TRANSFORMERS_LAYER_TYPES[spec.block],
        "depths": list(spec.num_block),
        "hidden_sizes": spec.stage_widths(),
    }
    features += [
        f"config.json {k}={cfg[k]!r} where the weights have {want!r}"
        for k, want in weights.items()
        if (list(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k]) != want
    ]
    return features


def check_hub_config(config: Mapping[str, Any], spec: ArchSpec) -> None:
    """Raise NotThisArchitecture when a hub config.json describes another network than ``spec``.

    A transformers config (``model_type: resnet``) is checked flag by flag; a timm config's
    ``architecture`` must be a plain ``resnet<depth>`` (timm's blur-pool and anti-aliased variants
    have the plain keys, so only the name tells them apart) for plain weights, and the builder name
    for a family variant's. Other configs say nothing checked here.
    """
    if config.get("model_type") == "resnet":
        features = _transformers_features(config, spec)
    elif isinstance(arch := config.get("architecture"), str):
        base = arch.split(".")[0]
        if spec.variant_options():
            features = (
                [] if base == spec.name else [f"timm architecture {base!r} where the weights are {spec.describe()}"]
            )
        else:
            features = [] if _TIMM_PLAIN.match(base) else [f"timm architecture {base!r}, not a plain resnet<depth>"]
    else:
        features = []
    if features:
        raise not_this_architecture(features)


def class_count_mismatches(config: Mapping[str, Any], spec: ArchSpec) -> list[str]:
    """Where a model directory's config.json gives another class count than ``spec``'s, one phrase each.

    transformers builds the classifier from ``id2label`` (``num_labels`` is its length), timm from
    ``num_classes``; a loader given this directory would build another head than the weights have.
    """
    counts: list[tuple[str, Any]] = []
    if config.get("model_type") == "resnet":
        labels = {k: config[k] for k in ("id2label", "label2id") if isinstance(config.get(k), Mapping)}
        counts += [(f"{k} has {len(v)} labels", len(v)) for k, v in labels.items()]
        counts += [(f"num_labels={config['num_labels']!r}", config["num_labels"])] if "num_labels" in config else []
    elif isinstance(config.get("architecture"), str):
        pretrained = config.get("pretrained_cfg")
        counts += [(f"num_classes={config['num_classes']!r}", config["num_classes"])] if "num_classes" in config else []
        if isinstance(pretrained, Mapping) and "num_classes" in pretrained:
            counts.append((f"pretrained_cfg num_classes={pretrained['num_classes']!r}", pretrained["num_classes"]))
    return [f"config.json {phrase}" for phrase, count in counts if count != spec.num_classes]
