"""The ResNet family against torchvision's and timm's own models: converted both ways, proven equal.

fp64 proves the semantics of each option (grouped, wide, deep stem + average-pool shortcut,
squeeze-and-excitation) on one-block-per-stage models of the libraries' own classes: Flax (linen,
converted) equals the library's model in eval, train-mode logits and running statistics, gradients and
three SGD steps to 1e-10, and resnet_torch holding the same weights equals it in eval, train mode,
statistics and gradients; so the chain library == resnet_torch == Flax is closed for every option
(tests/test_family_models.py relies on it and proves NNX == linen bit for bit). fp32 eval bounds every
builder at full size against the library's own model, with realistic random BatchNorm statistics, by the
documented eval tolerance. Round trips are bit-identical. Nothing is downloaded: every model is built
locally with random weights.
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import torchvision
from flax import traverse_util
from timm.models.resnet import BasicBlock as TimmBasicBlock
from timm.models.resnet import Bottleneck as TimmBottleneck
from timm.models.resnet import ResNet as TimmResNet
from torchvision.models.resnet import BasicBlock as TvBasicBlock
from torchvision.models.resnet import Bottleneck as TvBottleneck
from torchvision.models.resnet import ResNet as TvResNet

import parity
from parity.checks import check_pair, pair_of
from parity.checks.compare import errors, numpy_of_jax, numpy_of_torch
from parity.checks.pairs import TO_NHWC, make_batch, randomize_batchnorm
from parity.checks.precision import (
    CHECKS,
    CPU,
    EVAL,
    FP32,
    FP64,
    GRADIENTS,
    MODES,
    RUNNING_STATS,
    TRAIN_LOGITS,
    applied,
)
from parity.checks.reference import seed_named
from parity.cli import main
from parity.conversion.arch import ArchSpec
from parity.conversion.convert import check_state_dict
from parity.conversion.names import from_seed, recognise
from resnet_arch import VARIANTS

NUM_CLASSES = 10
ODD_SIZE = (33, 35)  # odd: the ceil-mode average pool and 'SAME' padding differ from symmetric ones here
TINY = [1, 1, 1, 1]
FP64_BAR = MODES[FP64].tolerances[EVAL]  # 1e-10: every float64 check's tolerance
CALIBRATION_BATCH = 4  # images whose train-mode statistics become the running statistics
STATS_JITTER = 0.05  # running mean += 5% of the deviation, running variance *= 1 +- 5%
RESIDUAL_SCALE_DAMPING = 0.2  # each block's last BatchNorm scale, random in 0.5-1.5, becomes 0.1-0.3
# The libraries' residual blocks: each ends its residual branch in bn2 (BasicBlock) or bn3 (Bottleneck).
BLOCKS = (TvBasicBlock, TvBottleneck, TimmBasicBlock, TimmBottleneck)
# Each option in a model of the library's own class, one block per stage: torchvision's grouped
# ResNeXt, and timm's wide ResNet-D with squeeze-and-excitation (wide, deep stem, average-pool shortcut, SE).
OPTIONS = {
    "grouped (torchvision)": lambda: TvResNet(
        TvBottleneck, TINY, groups=32, width_per_group=4, num_classes=NUM_CLASSES
    ),
    "wide + deep stem + avg_down + se (timm)": lambda: TimmResNet(
        TimmBottleneck,
        TINY,
        base_width=128,
        stem_type="deep",
        stem_width=32,
        avg_down=True,
        block_args=dict(attn_layer="se"),
        num_classes=NUM_CLASSES,
    ),
}
TIMM_OPTIONS = "wide + deep stem + avg_down + se (timm)"
# Each builder's own library: torchvision where it has the builder, timm otherwise.
LIBRARY = {name: "torchvision" if name.startswith(("resnext", "wide")) else "timm" for name in VARIANTS}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """torch on one thread: on these small inputs a second one only adds synchronisation, which costs
    many times the work itself on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _library_model(name: str, library: str, **kwargs) -> torch.nn.Module:
    if library == "torchvision":
        return torchvision.models.get_model(name, weights=None, **kwargs)
    return timm.create_model(name, pretrained=False, **kwargs)


def _random(build, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build()
    randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    return model.eval()


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _same_tree(a: dict, b: dict) -> bool:
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    return fa.keys() == fb.keys() and all(
        np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype and np.array_equal(np.asarray(fa[k]), np.asarray(fb[k]))
        for k in fa
    )


# --- names and shapes: every builder, as its library names it -------------------------------------


# The builders up to 50 layers, in each library that builds them: the rule over names holds at every depth
# (the deeper builders are converted at full size by the float32 test below).
SHALLOW = [(name, lib) for name, lib in LIBRARY.items() if VARIANTS[name][0] in ("resnet18", "resnet34", "resnet50")]


@pytest.mark.parametrize("name, library", [*SHALLOW, ("resnext50_32x4d", "timm"), ("wide_resnet50_2", "timm")])
def test_library_keys_are_read_as_the_builder_and_written_back_in_its_order(name: str, library: str) -> None:
    """The library's own state dict is recognised as the builder by name, and the weights written in that
    library's layout are its keys in its order, which its model strict-loads."""
    with torch.device("meta"):
        model = _library_model(name, library, num_classes=NUM_CLASSES)
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}
    weights = check_state_dict(sd)
    assert weights.spec.name == name
    depth, options = VARIANTS[name]
    assert weights.spec.variant_options() == options
    out = weights.to_torch(library)
    assert list(out) == list(sd)
    model.load_state_dict(out, strict=True, assign=True)


def test_a_variant_has_no_transformers_layout_reading_or_writing() -> None:
    spec = ArchSpec("BottleNeck", (3, 4, 6, 3), NUM_CLASSES, False, groups=32, width_per_group=4)
    # transformers' names over ResNeXt shapes: read as a ResNeXt, refused naming it before any data is read.
    hf = {from_seed(k, "transformers"): torch.empty(s, device="meta") for k, s in spec.torch_shapes().items()}
    with pytest.raises(parity.ConversionError, match=r"resnext50_32x4d \(groups=32, width_per_group=4\) has no "):
        parity.torch_to_flax(hf)
    variables = parity.torch_to_flax(_random(OPTIONS[TIMM_OPTIONS]))
    refused = r"a network \(width_per_group=128, stem='deep', avg_down=True, se=True\) has no transformers layout"
    with pytest.raises(parity.ConversionError, match=refused):
        parity.flax_to_torch(variables, layout="transformers")


def test_every_missing_unexpected_and_misshapen_key_is_named_at_once() -> None:
    sd = dict(_random(OPTIONS[TIMM_OPTIONS]).state_dict())
    del sd["layer2.0.se.fc2.bias"]
    sd["layer3.0.downsample.5.weight"] = torch.zeros(1)
    sd["layer1.0.se.fc1.weight"] = torch.zeros(8, 256, 1, 1)  # timm's width is make_divisible(256 / 16, 8) = 16
    with pytest.raises(parity.ConversionError) as e:
        parity.torch_to_flax(sd)
    message = str(e.value)
    assert "missing (1): layer2.0.se.fc2.bias" in message
    assert "unexpected (1): layer3.0.downsample.5.weight" in message
    assert "layer1.0.se.fc1.weight: got (8, 256, 1, 1), expected (16, 256, 1, 1)" in message


def test_timm_hub_config_names_the_variant() -> None:
    spec = parity.arch_of(_random(OPTIONS[TIMM_OPTIONS]))
    assert spec.name is None and spec.describe().startswith("custom (BottleNeck [1, 1, 1, 1], width_per_group=128, ")
    full = ArchSpec("BottleNeck", (3, 4, 6, 3), NUM_CLASSES, False, stem="deep", avg_down=True)
    assert full.hub_config("timm")["architecture"] == "resnet50d"
    with pytest.raises(parity.ConversionError, match=r"timm architecture 'resnet50' where the weights are resnet50d"):
        check_state_dict(
            {k: torch.empty(s, device="meta") for k, s in full.torch_shapes().items()},
            config={"architecture": "resnet50"},
        )


# --- fp64: each option equals the library's own model in eval, train mode, gradients, SGD -------------


def _torch_results(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[list[np.ndarray]]:
    """[eval logits], [train-mode logits], [running statistics], [gradients], by seed-style key order."""
    model.eval()
    with torch.no_grad():
        eval_logits = model(x)
    model.train()
    logits = model(x)
    torch.nn.functional.cross_entropy(logits, y).backward()
    renamed = recognise(model.state_dict())[1]  # library key -> seed key
    stats = {renamed[k]: v for k, v in model.state_dict().items() if "running_" in k}
    grads = {renamed[k]: p.grad for k, p in model.named_parameters()}
    return [[numpy_of_torch(eval_logits)], [numpy_of_torch(logits)]] + [
        [numpy_of_torch(d[k]) for k in sorted(d)] for d in (stats, grads)
    ]


@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_equals_the_library_model_in_float64(option: str) -> None:
    """The library's model against its Flax conversion (every parity check, three SGD steps included),
    and against resnet_torch holding its weights (eval, train-mode logits, running statistics,
    gradients): library == Flax and library == resnet_torch, so resnet_torch == Flax, for every option.
    """
    with applied(MODES[FP64], CPU):
        pair = pair_of(OPTIONS[option](), option, FP64, CPU, seed=1)
        ours = parity.arch_of(pair.torch_model).torch_model().double()  # built without init: the weights come next
        ours.load_state_dict(seed_named(pair.torch_model.state_dict()), strict=True)
        batch = make_batch(pair, ODD_SIZE, 2, 1)
        want = _torch_results(copy.deepcopy(pair.torch_model), batch.x_torch, batch.y_torch)
        got = _torch_results(ours, batch.x_torch, batch.y_torch)
        results = check_pair(pair, ODD_SIZE, 2, seed=1)
    for check, g, w in zip((EVAL, TRAIN_LOGITS, RUNNING_STATS, GRADIENTS), got, want, strict=True):
        assert errors(g, w)[1] <= FP64_BAR, f"resnet_torch against {option}: {check}"
    assert [r.check for r in results] == list(CHECKS)
    for r in results:
        assert r.passed and r.rel <= FP64_BAR, f"{option} {r.check}: {r.rel:.3e} (first diverging: {r.first_diverging})"


# --- fp32: every builder at full size against its library's own model ---------------------------------


def _realistic_batchnorm(model: torch.nn.Module, x: torch.Tensor, generator: torch.Generator) -> None:
    """Random BatchNorm parameters (``randomize_batchnorm``) with running statistics a trained network
    could have: measured on ``x`` in train mode (momentum=None: the plain average), then jittered by a
    few percent; each block's last BatchNorm scale is damped to 0.1-0.3.

    Why: trained ResNets end their residual branches in small scales (timm initialises them to zero),
    and a deep random network without that amplifies float32 rounding about 1.15x per block, so
    torch's own float32 result drifts from its float64 one by more than the eval tolerance.
    """
    randomize_batchnorm(model, generator)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    counters = [int(m.num_batches_tracked) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        model.train()(x)
        for m, count in zip(norms, counters, strict=True):
            c = m.num_features
            m.momentum = 0.1
            m.num_batches_tracked.fill_(count)
            m.running_mean.add_(torch.randn(c, generator=generator) * STATS_JITTER * m.running_var.sqrt())
            m.running_var.mul_(1 + STATS_JITTER * (2 * torch.rand(c, generator=generator) - 1))
        for block in model.modules():
            if isinstance(block, BLOCKS):
                last = block.bn3 if hasattr(block, "bn3") else block.bn2
                last.weight.mul_(RESIDUAL_SCALE_DAMPING)
    model.eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_builder_equals_its_library_model_in_float32_eval(name: str) -> None:
    """The library's own full-size model (realistic random BatchNorm statistics: ``_realistic_batchnorm``)
    converted to Flax, on one odd 33x35 image, within the float32 eval tolerance; the weights are
    recognised as the builder.

    33 and 35 are the smallest sizes that stay odd and above 1 at every average-pool shortcut
    (33 -> 17 -> 9 -> 5 -> 3). Flax runs eagerly: a full-size program would compile for tens of
    seconds, while eagerly each primitive compiles once per shape, shared by every depth.
    """
    torch.manual_seed(0)
    model = _library_model(name, LIBRARY[name], num_classes=NUM_CLASSES)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, *ODD_SIZE, generator=g)
    _realistic_batchnorm(model, torch.randn(CALIBRATION_BATCH, 3, *ODD_SIZE, generator=g), g)
    with torch.inference_mode():
        want = model(x)
    spec = parity.arch_of(model)
    assert spec.name == name
    mode = MODES[FP32]
    with applied(mode, CPU):
        dtypes = dict(dtype=mode.jax_dtype, param_dtype=mode.jax_param_dtype)
        flax_model = spec.flax_model(**dtypes, precision=mode.jax_precision)
        got = flax_model.apply(parity.torch_to_flax(model), jnp.asarray(x.numpy().transpose(TO_NHWC)), train=False)
    rel = errors([numpy_of_jax(got)], [numpy_of_torch(want)])[1]
    assert rel <= mode.tolerances[EVAL], f"{name}: {rel:.3e}"


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("option", list(OPTIONS))
def test_round_trips_are_bit_identical(option: str) -> None:
    """library layout -> Flax -> library layout, and Flax -> seed layout -> resnet_torch -> Flax."""
    model = _random(OPTIONS[option])
    library = "timm" if "timm" in option else "torchvision"
    variables = parity.torch_to_flax(model)
    assert _same_tensors(parity.flax_to_torch(variables, layout=library), collections.OrderedDict(model.state_dict()))
    with torch.device("meta"):
        ours = parity.arch_of(variables).torch_model()
    ours.load_state_dict(parity.flax_to_torch(variables), strict=True, assign=True)
    assert _same_tree(parity.torch_to_flax(ours.state_dict()), variables)


def test_check_command_refuses_a_builder_the_library_lacks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--arch", "resnet50d", "--reference", "torchvision", "--precision", "fp64"]) == 2
    assert "torchvision builds no resnet50d" in capsys.readouterr().err
