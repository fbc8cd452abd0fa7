"""The same random ResNet in both frameworks, and random batches for it."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from resnet_arch import APIS, BN_STATS, HEAD, LINEN, NNX

from .compare import CheckResult, errors
from .linen import LinenSide
from .nnx import NnxSide
from .precision import MODES, Mode, torch_device
from .reference import RESNET_TORCH, check_reference, reference_model
from .side import FlaxSide

NUM_CLASSES = 10  # the seed's default classifier width
# torch NCHW (batch, channels, height, width) -> Flax NHWC.
TO_NHWC = (0, 2, 3, 1)
# How each Flax API's side is built from the torch model: (torch_model, mode, device, fused_bn).
SIDES: dict[str, Callable[..., FlaxSide]] = {LINEN: LinenSide.from_torch, NNX: NnxSide.from_torch}


@dataclasses.dataclass
class Pair:
    """The same weights in both frameworks, on one device, in one precision mode."""

    arch: str
    device: str
    mode: Mode
    torch_model: torch.nn.Module  # resnet_torch's, torchvision's or timm's ResNet
    flax: FlaxSide  # the Flax model (linen or NNX) and how the checks call it


@dataclasses.dataclass
class Batch:
    """NCHW images and integer labels on the torch side, NHWC and labels on the JAX side."""

    x_torch: torch.Tensor
    y_torch: torch.Tensor
    x_jax: jax.Array
    y_jax: jax.Array


def randomize_batchnorm(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm random affine parameters, running statistics and counter.

    Fresh BatchNorms (scale 1, bias 0, mean 0, var 1) would hide a converter that drops or swaps them.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(c, generator=generator) * 0.1)
                buffers = dict(m.named_buffers())
                running_mean, running_var, count = (buffers[name] for name in BN_STATS)
                running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
                running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                count.fill_(int(torch.randint(0, 100, (), generator=generator)))


def make_pair(
    arch: str,
    precision: str,
    device: str,
    seed: int = 0,
    num_classes: int = NUM_CLASSES,
    fused_bn: bool = False,
    api: str = LINEN,
    reference: str = RESNET_TORCH,
) -> Pair:
    """A randomly initialised torch model and its resnet_flax copy (call inside ``applied``).

    The torch model is ``reference``'s: resnet_torch's, torchvision's or timm's own (``parity.checks.
    reference``). ``fused_bn`` gives the Flax side the fused train-mode BatchNorm, as training uses it;
    ``api="nnx"`` makes it a ``resnet_flax.nnx`` model, converted by ``parity.torch_to_nnx``.
    """
    check_reference(arch, reference)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = reference_model(arch, reference, num_classes)
    return pair_of(model, arch, precision, device, seed, fused_bn, api)


def pair_of(
    model: torch.nn.Module,
    arch: str,
    precision: str,
    device: str,
    seed: int = 0,
    fused_bn: bool = False,
    api: str = LINEN,
) -> Pair:
    """A torch model (resnet_torch's, torchvision's or timm's ResNet, of any depth) and its resnet_flax copy
    of the architecture its weights describe, named ``arch`` in the results (call inside ``applied``).

    The model's BatchNorms get random statistics first (``randomize_batchnorm``); it is the pair's own.
    """
    if api not in APIS:
        raise ValueError(f"api must be one of {', '.join(APIS)}, got {api!r}")
    mode = MODES[precision]
    randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    model = model.to(device=torch_device(device), dtype=mode.torch_dtype)
    return Pair(arch, device, mode, model, SIDES[api](model, mode, device, fused_bn))


def make_batch(pair: Pair, size: tuple[int, int], batch: int, seed: int) -> Batch:
    """A fresh random batch (standard normal images, uniform labels) for both frameworks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *size, generator=g, dtype=torch.float64).to(pair.mode.torch_dtype)
    head = typing.cast(torch.nn.Linear, pair.torch_model.get_submodule(HEAD))  # in every reference model
    y = torch.randint(0, head.out_features, (batch,), generator=g)
    x_jax = jnp.asarray(x.numpy().transpose(TO_NHWC), dtype=pair.mode.jax_param_dtype)
    dev = torch_device(pair.device)
    return Batch(x.to(dev), y.to(dev), x_jax, jnp.asarray(y.numpy()))


def autocast(pair: Pair) -> Any:
    """torch.autocast for the pair's mode (a no-op context unless the mode computes in bf16)."""
    dtype = pair.mode.torch_autocast
    return torch.autocast(torch_device(pair.device).type, dtype=dtype, enabled=dtype is not None)


def pair_result(
    pair: Pair,
    check: str,
    got: list[np.ndarray],
    ref: list[np.ndarray],
    stages: dict[str, float],
    basis: str,
    floor: float = 0.0,
) -> CheckResult:
    """The result of one check of a pair: errors over got against ref, with the mode's tolerance."""
    max_abs, rel = errors(got, ref)
    tol = pair.mode.tolerances[check]
    return CheckResult(pair.arch, pair.mode.name, pair.device, check, max_abs, rel, tol, stages, basis, floor)
