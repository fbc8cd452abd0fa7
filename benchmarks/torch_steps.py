"""resnet_torch and torchvision's ResNet: eager or torch.compile, channels_last, autocast for bf16."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import resnet_torch
from resnet_data.transforms import IMAGENET_MEAN, IMAGENET_STD
from resnet_train.presets import PRESETS, preset_values

from .common import PRESET, Settings, Step

# bf16 runs use autocast (bf16 convolutions and matmuls, float32 weights and BatchNorm), as AMP does.
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def torchvision_available() -> bool:
    """Whether torchvision can be imported (its ResNet is the reference, but optional)."""
    return importlib.util.find_spec("torchvision") is not None


def _device(settings: Settings) -> torch.device:
    return torch.device("cuda" if settings.device == "gpu" else "cpu")


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _model(family: str, settings: Settings) -> torch.nn.Module:
    if family == "torchvision":
        import torchvision

        model = torchvision.models.get_model(settings.arch, num_classes=settings.num_classes)
    else:
        model = resnet_torch.build(settings.arch, num_classes=settings.num_classes, small_stem=settings.small_stem)
    return model.to(_device(settings), memory_format=torch.channels_last)


def _data(settings: Settings, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 NCHW images (channels_last in memory) and integer labels, made on the device."""
    device = _device(settings)
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    shape = (batch, 3, settings.size, settings.size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=gen)
    labels = torch.randint(0, settings.num_classes, (batch,), device=device, generator=gen)
    return images.contiguous(memory_format=torch.channels_last), labels


def normalize(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW images -> ImageNet-normalised float32 images, channels_last, on the device."""
    mean = torch.tensor(IMAGENET_MEAN, device=images_u8.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images_u8.device).view(1, 3, 1, 1)
    return ((images_u8.float() / 255.0 - mean) / std).contiguous(memory_format=torch.channels_last)


def _autocast(settings: Settings) -> contextlib.AbstractContextManager[Any]:
    dtype = AUTOCAST_DTYPES[settings.dtype]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device(settings).type, dtype=dtype)


def _name(family: str, compiled: bool) -> str:
    return f"{family}+compile" if compiled else family


def sgd(model: torch.nn.Module, batch: int) -> torch.optim.Optimizer:
    """The trainer's recipe as a PyTorch user writes it: SGD with Nesterov momentum, weight decay on the
    kernels only (not BatchNorm's scales and biases nor the fc bias), at the recipe's learning rate for
    ``batch``."""
    recipe = preset_values(PRESET, batch_size=batch)
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": recipe["weight_decay"]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=recipe["lr"], momentum=recipe["momentum"], nesterov=recipe["nesterov"])


def train(family: str, settings: Settings, compiled: bool) -> Step:
    """A train step of ``family`` on a fixed batch, the loop a PyTorch user writes for the trainer's recipe:
    normalise, forward under autocast (bf16), label-smoothed cross-entropy, backward, ``sgd``.

    With ``compiled`` the model goes through ``torch.compile`` (its backward too, through AOTAutograd);
    normalisation, loss and the optimizer step stay eager, as in a stock training loop.
    """
    model = _model(family, settings).train()
    images, labels = _data(settings, settings.batch)
    opt = sgd(model, settings.batch)
    label_smoothing = PRESETS[PRESET]["label_smoothing"]
    forward = torch.compile(model) if compiled else model

    def run() -> None:
        with _autocast(settings):
            logits = forward(normalize(images))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return Step(_name(family, compiled), "train", run, _sync(_device(settings)))


def infer(family: str, settings: Settings, compiled: bool, batch: int | None = None) -> Step:
    """Eval-mode logits of ``family`` under inference_mode, on a fixed batch."""
    model = _model(family, settings).eval()
    images, _ = _data(settings, batch or settings.batch)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with _autocast(settings):
            return model(normalize(x))

    forward_step = torch.compile(forward) if compiled else forward

    def run() -> None:
        with torch.inference_mode():
            forward_step(images)

    return Step(_name(family, compiled), "infer", run, _sync(_device(settings)))
