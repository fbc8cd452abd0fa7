"""Read the architecture (block type, stage sizes, classes, stem) back from keys and shapes."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

from resnet_torch.arch import STAGES, arch_name

_BLOCK_KEY = re.compile(r"^conv([2-5])_x\.(\d+)\.residual_function\.(\d)\.")


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

    def model_kwargs(self) -> dict[str, Any]:
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
    blocks: dict[int, int] = {}
    bottleneck = False
    for key in shapes:
        if m := _BLOCK_KEY.match(key):
            stage, index = int(m[1]), int(m[2])
            blocks[stage] = max(blocks.get(stage, 0), index + 1)
            bottleneck |= int(m[3]) >= 6
    problems = []
    stems = shapes.get("conv1.0.weight")
    fc = shapes.get("fc.weight")
    if stems is None or len(stems) != 4:
        problems.append("conv1.0.weight (the stem convolution)")
    if fc is None or len(fc) != 2:
        problems.append("fc.weight (the classifier)")
    missing_stages = [f"conv{s}_x" for s in range(2, 2 + len(STAGES)) if s not in blocks]
    if missing_stages:
        problems.append("blocks of " + ", ".join(missing_stages))
    if problems:
        raise ValueError("cannot read a ResNet architecture from these keys: missing " + "; ".join(problems))
    return ArchSpec(
        block="BottleNeck" if bottleneck else "BasicBlock",
        num_block=tuple(blocks[s] for s in range(2, 2 + len(STAGES))),
        num_classes=int(fc[0]),
        small_stem=int(stems[-1]) == 3,
    )
