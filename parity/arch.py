"""Read the architecture (block type, stage sizes, classes, stem) back from keys and shapes."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from resnet_arch import BN_COUNTER, BN_PARAMS, BN_STATS, HEAD, IN_CHANNELS, STAGES, STEM, STEM_WIDTH, arch_name

# Per block type, each convolution of residual_function in order: (kernel size, output width as a
# multiple of the stage width; the last one's factor is the block's expansion). The block's
# Sequential puts conv j at index 3*j and its BatchNorm at 3*j + 1 (a ReLU fills the third slot).
BLOCK_CONVS: dict[str, tuple[tuple[int, int], ...]] = {
    "BasicBlock": ((3, 1), (3, 1)),
    "BottleNeck": ((1, 1), (3, 1), (1, 4)),
}
_SEQ_SLOTS = 3  # conv, BatchNorm, ReLU
_STEM_KERNEL = {False: 7, True: 3}  # small_stem -> stem kernel size

_BLOCK_KEY = re.compile(r"^(\w+)\.(\d+)\.residual_function\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """What builds a model that fits a checkpoint, in either framework."""

    block: str
    num_block: tuple[int, ...]
    num_classes: int
    small_stem: bool

    @property
    def name(self) -> str | None:
        """'resnet50' etc., or None for a stage layout outside the depth table."""
        return arch_name(self.block, self.num_block)

    def describe(self) -> str:
        """A one-line description, e.g. 'resnet50 (BottleNeck [3, 4, 6, 3], 1000 classes)'."""
        stem = ", small stem" if self.small_stem else ""
        return f"{self.name or 'custom'} ({self.block} {list(self.num_block)}, {self.num_classes} classes{stem})"

    def torch_shapes(self) -> dict[str, tuple[int, ...]]:
        """{seed state-dict key: torch shape}, in the order resnet_torch registers them."""
        convs = BLOCK_CONVS[self.block]
        shapes: dict[str, tuple[int, ...]] = {}

        def conv_bn(conv: str, bn: str, c_in: int, c_out: int, k: int) -> None:
            shapes[f"{conv}.weight"] = (c_out, c_in, k, k)
            # torch registers weight, bias, running_mean, running_var, then the scalar counter.
            shapes.update({f"{bn}.{leaf}": () if leaf == BN_COUNTER else (c_out,) for leaf in (*BN_PARAMS, *BN_STATS)})

        conv_bn(f"{STEM}.0", f"{STEM}.1", IN_CHANNELS, STEM_WIDTH, _STEM_KERNEL[self.small_stem])
        c_in = STEM_WIDTH
        for (stage, width, stride), blocks in zip(STAGES, self.num_block, strict=True):
            for i in range(blocks):
                prefix, c = f"{stage}.{i}", c_in
                for j, (k, factor) in enumerate(convs):
                    slot = f"{prefix}.residual_function.{_SEQ_SLOTS * j}"
                    conv_bn(slot, f"{prefix}.residual_function.{_SEQ_SLOTS * j + 1}", c, width * factor, k)
                    c = width * factor
                # Projection shortcut exactly when the block changes the shape (resnet_torch's _shortcut).
                if (stride if i == 0 else 1) != 1 or c_in != c:
                    conv_bn(f"{prefix}.shortcut.0", f"{prefix}.shortcut.1", c_in, c, 1)
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
        return cls(model.block.__name__, tuple(model.num_block), model.num_classes, model.small_stem)

    def model_kwargs(self) -> dict[str, Any]:
        """The builder options this spec fixes."""
        return dict(num_classes=self.num_classes, small_stem=self.small_stem)

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


def infer_arch(shapes: Mapping[str, Sequence[int]]) -> ArchSpec:
    """The architecture of a checkpoint from its seed-layout keys and torch shapes.

    Raises ValueError naming what is missing when the keys do not describe a ResNet.
    """
    stage_names = [name for name, _, _ in STAGES]
    blocks: dict[str, int] = {}
    last_slot = 0
    for key in shapes:
        if (m := _BLOCK_KEY.match(key)) and m[1] in stage_names:
            blocks[m[1]] = max(blocks.get(m[1], 0), int(m[2]) + 1)
            last_slot = max(last_slot, int(m[3]))
    convs = last_slot // _SEQ_SLOTS + 1
    block = next((name for name, layers in BLOCK_CONVS.items() if len(layers) == convs), None)
    stem, fc = shapes.get(f"{STEM}.0.weight"), shapes.get(f"{HEAD}.weight")
    small_stem = {k: small for small, k in _STEM_KERNEL.items()}.get(int(stem[-1])) if stem and len(stem) == 4 else None
    problems = []
    if small_stem is None:
        problems.append(f"{STEM}.0.weight (the stem convolution, 7x7 or 3x3)")
    if fc is None or len(fc) != 2:
        problems.append(f"{HEAD}.weight (the classifier)")
    missing_stages = [name for name in stage_names if name not in blocks]
    if missing_stages:
        problems.append("blocks of " + ", ".join(missing_stages))
    elif block is None:
        problems.append(f"a block type with {convs} convolutions (BasicBlock has 2, BottleNeck 3)")
    if problems or block is None or fc is None or small_stem is None:  # problems names each of these
        raise ValueError("cannot read a ResNet architecture from these keys: missing " + "; ".join(problems))
    return ArchSpec(
        block=block,
        num_block=tuple(blocks[name] for name in stage_names),
        num_classes=int(fc[0]),
        small_stem=small_stem,
    )
