"""The torch model a Flax model is checked against: resnet_torch's, or torchvision's or timm's own.

The checks call a torch model through ``torch_stages`` (every stage's output by the seed's stage
names) and read its tensors through ``seed_named`` (its state-dict keys as the seed's), so a
torchvision or timm ResNet is checked as it is, by its own ``forward``, against the Flax model the
converter fills from its state dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import torch

import resnet_torch
from resnet_arch import HEAD, STAGES, STEM

from ..conversion.names import TIMM, TORCHVISION, recognise

RESNET_TORCH = "resnet_torch"
# The torch models a check can compare with: this project's, torchvision's and timm's.
REFERENCES = (RESNET_TORCH, TORCHVISION, TIMM)
T = TypeVar("T")


def check_reference(arch: str, reference: str) -> None:
    """ValueError with a sentence when ``reference`` is no torch model source or does not build ``arch``."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
    if reference == TORCHVISION:
        import torchvision

        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(
                f"torchvision builds no {arch} (its ResNets: resnet18..152, resnext*, wide_resnet*; --reference timm "
                "builds the others)"
            )
    elif reference == TIMM:
        import timm

        if not timm.is_model(arch):
            raise ValueError(f"timm builds no {arch}")


def reference_model(arch: str, reference: str, num_classes: int) -> torch.nn.Module:
    """A randomly initialised ``arch`` of ``reference``'s (resnet_torch, torchvision or timm), no weights
    downloaded."""
    check_reference(arch, reference)
    if reference == TORCHVISION:
        import torchvision

        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if reference == TIMM:
        import timm

        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    return resnet_torch.build(arch, num_classes=num_classes)


def torch_stages(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every stage's output by the seed's names (``conv1``, ``conv2_x``..``conv5_x``, ``fc``), in order.

    resnet_torch's model has ``forward_stages``; a torchvision or timm ResNet runs its own ``forward``
    while hooks keep the max-pool's output (the stem's) and each ``layerN``'s.
    """
    if isinstance(model, resnet_torch.ResNet):
        return model.forward_stages(x)
    modules = {STEM: model.maxpool, **{name: getattr(model, f"layer{i + 1}") for i, (name, _, _) in enumerate(STAGES)}}
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda _m, _in, out, name=name: outputs.__setitem__(name, out))
        for name, module in modules.items()
    ]
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return {**{name: outputs[name] for name in modules}, HEAD: logits}


def seed_named(tensors: Mapping[str, T]) -> dict[str, T]:
    """A torch model's tensors (state dict, gradients) under the seed's keys, whatever layout names them."""
    renamed = recognise(tensors)[1]
    return {renamed[k]: v for k, v in tensors.items() if k in renamed}
