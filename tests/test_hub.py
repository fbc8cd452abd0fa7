"""The model hubs' layouts against the real libraries: timm, transformers, their directories, variants refused.

Everything is built locally with random weights (HF_HUB_OFFLINE=1): nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import torchvision
import transformers
from flax import traverse_util
from timm.models import save_for_hf

import parity
from parity.checks.pairs import randomize_batchnorm
from parity.cli import main
from resnet_arch import DEPTHS

os.environ["HF_HUB_OFFLINE"] = "1"  # from_pretrained reads the local directory; never the network

EVAL_RTOL_FP32 = 1e-5
ODD_SIZE = (33, 47)  # odd, non-square: symmetric padding and 'SAME' differ here
NUM_CLASSES = 7
# The networks of the microsoft/resnet-18..152 checkpoints, as transformers ResNetConfig fields.
HF_CONFIGS = {
    "resnet18": dict(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512]),
    "resnet34": dict(layer_type="basic", depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 256, 512]),
    "resnet50": dict(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048]),
    "resnet101": dict(layer_type="bottleneck", depths=[3, 4, 23, 3], hidden_sizes=[256, 512, 1024, 2048]),
    "resnet152": dict(layer_type="bottleneck", depths=[3, 8, 36, 3], hidden_sizes=[256, 512, 1024, 2048]),
}
# A one-block-per-stage network: cheap, and a depth no table holds.
TINY_HF = dict(layer_type="basic", depths=[1, 1, 1, 1], hidden_sizes=[64, 128, 256, 512])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def _logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = model.eval()(x)
    return getattr(out, "logits", out).numpy()


def _flax_logits(variables: dict, x: torch.Tensor) -> np.ndarray:
    """Eager apply: its per-op compilations are shared by every depth (jit compiles each model whole)."""
    return np.asarray(parity.arch_of(variables).flax_model().apply(variables, _nhwc(x), train=False))


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _same_tree(a: dict, b: dict) -> bool:
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    return fa.keys() == fb.keys() and all(
        np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype and np.array_equal(np.asarray(fa[k]), np.asarray(fb[k]))
        for k in fa
    )


def _hf_model(**config) -> transformers.ResNetForImageClassification:
    return transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=NUM_CLASSES, **config))


def _random_hf(seed: int = 0, **config) -> transformers.ResNetForImageClassification:
    torch.manual_seed(seed)
    model = _hf_model(**config)
    randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    return model.eval()


# --- every depth of every library: same logits, bit-identical round trips ---------------------------


@pytest.mark.parametrize("name", list(DEPTHS))
def test_torchvision_timm_and_transformers_agree_with_flax_and_resnet_torch(name: str) -> None:
    """One random network (BatchNorm statistics randomized) as torchvision's, timm's, transformers' and
    resnet_torch's model and as resnet_flax: the same logits. Flax -> each layout -> the library's model
    -> its own state_dict() -> Flax is bit-identical, which reads every library's own keys."""
    tv = getattr(torchvision.models, name)(num_classes=NUM_CLASSES)
    randomize_batchnorm(tv, torch.Generator().manual_seed(len(name)))
    x = torch.randn(2, 3, *ODD_SIZE)
    expected = _logits(tv, x)
    variables = parity.torch_to_flax(tv)
    assert _rel(_flax_logits(variables, x), expected) < EVAL_RTOL_FP32
    with torch.device("meta"):
        libraries = {
            "timm": timm.create_model(name, num_classes=NUM_CLASSES),
            "transformers": _hf_model(**HF_CONFIGS[name]),
            "seed": parity.arch_of(variables).torch_model(),
        }
    for layout, model in libraries.items():
        model.load_state_dict(parity.flax_to_torch(variables, layout=layout), strict=True, assign=True)
        assert _rel(_logits(model, x), expected) < EVAL_RTOL_FP32, layout
        assert _same_tree(parity.torch_to_flax(model.state_dict()), variables), layout


# --- variants this model is not: refused with the feature named, before converting ------------------


@pytest.mark.parametrize(
    "name, feature",
    [
        ("ecaresnet50d", r"extra modules in the blocks: se \(attention other than squeeze-and-excitation"),
        ("resnetblur50", r"timm architecture 'resnetblur50', not a plain resnet<depth>"),
        ("resnet50_gn", r"no BatchNorm running statistics at all.*GroupNorm"),
    ],
)
def test_timm_variants_are_refused_naming_the_feature(name: str, feature: str) -> None:
    with torch.device("meta"):  # refused from names, shapes and config alone: no data needed
        model = timm.create_model(name, num_classes=NUM_CLASSES)
    with pytest.raises(parity.ConversionError, match=feature) as e:
        parity.torch_to_flax(model)
    assert "not this architecture" in str(e.value) or "GroupNorm" in str(e.value)


@pytest.mark.parametrize(
    "config, feature",
    [
        (dict(downsample_in_bottleneck=True), r"stride on the first 1x1 convolution.*ResNet v1"),
        (dict(downsample_in_first_stage=True), r"strided first stage \(downsample_in_first_stage=True"),
        ({**TINY_HF, "hidden_act": "gelu"}, r"activation 'gelu' \(hidden_act"),
        ({**TINY_HF, "embedding_size": 32}, r"a stem 32 channels wide \(transformers embedding_size"),
        ({**TINY_HF, "hidden_sizes": [64, 96, 256, 512]}, r"convolution widths .*96-96"),
    ],
)
def test_transformers_configs_this_model_is_not_are_refused(config: dict, feature: str) -> None:
    with torch.device("meta"):
        model = _hf_model(**config)
    with pytest.raises(parity.ConversionError, match=feature):
        parity.torch_to_flax(model)


def test_transformers_backbone_without_classifier_is_refused() -> None:
    with torch.device("meta"):
        backbone = transformers.ResNetModel(transformers.ResNetConfig(**TINY_HF))
    with pytest.raises(parity.ConversionError, match="no classifier.*ResNetModel is the backbone alone"):
        parity.torch_to_flax(backbone)


def test_small_stem_has_no_transformers_layout() -> None:
    variables = parity.torch_to_flax(parity.ArchSpec("BasicBlock", (1, 1, 1, 1), 3, True).torch_model())
    with pytest.raises(parity.ConversionError, match="small stem .* no transformers equivalent"):
        parity.flax_to_torch(variables, layout="transformers")


# --- hub directories ------------------------------------------------------------------------------


def test_transformers_directory_loads_as_either_model(tmp_path: Path) -> None:
    model = _random_hf(**TINY_HF)
    model.save_pretrained(tmp_path / "hf")
    x = torch.randn(2, 3, *ODD_SIZE)
    expected = _logits(model, x)
    flax_model, variables = parity.load_checkpoint(tmp_path / "hf", "linen")
    assert _rel(np.asarray(flax_model.apply(variables, _nhwc(x), train=False)), expected) < EVAL_RTOL_FP32
    np.testing.assert_array_equal(_logits(parity.load_checkpoint(tmp_path / "hf", "torch"), x), expected)


def test_directory_config_is_checked_before_converting(tmp_path: Path) -> None:
    _random_hf(**{**TINY_HF, "layer_type": "basic"}).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "hidden_act": "silu"}))
    with pytest.raises(parity.ConversionError, match=r"hf: activation 'silu'"):
        parity.load_checkpoint(tmp_path / "hf", "linen")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "depths": [2, 1, 1, 1]}))
    with pytest.raises(parity.ConversionError, match=r"config.json depths=\[2, 1, 1, 1\] where the weights have"):
        parity.load_checkpoint(tmp_path / "hf", "torch")


def test_convert_to_a_transformers_directory_that_from_pretrained_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _random_hf(**TINY_HF)
    model.save_pretrained(tmp_path / "hf")
    flax_file = tmp_path / "flax.safetensors"
    assert main(["convert", str(tmp_path / "hf"), str(flax_file)]) == 0
    assert main(["convert", str(flax_file), str(tmp_path / "out"), "--layout", "transformers"]) == 0
    assert "out/model.safetensors (torch, transformers names)" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    loaded = transformers.ResNetForImageClassification.from_pretrained(tmp_path / "out")
    assert _same_tensors(loaded.state_dict(), model.state_dict())
    x = torch.randn(2, 3, *ODD_SIZE)
    np.testing.assert_array_equal(_logits(loaded, x), _logits(model, x))


def test_timm_directories_both_ways(tmp_path: Path) -> None:
    model = timm.create_model("resnet18", num_classes=NUM_CLASSES)
    randomize_batchnorm(model, torch.Generator().manual_seed(5))
    save_for_hf(model, tmp_path / "timm")  # pytorch_model.bin + config.json, as timm leaves them
    x = torch.randn(1, 3, *ODD_SIZE)
    flax_model, variables = parity.load_checkpoint(tmp_path / "timm", "linen")
    assert _rel(np.asarray(flax_model.apply(variables, _nhwc(x), train=False)), _logits(model, x)) < EVAL_RTOL_FP32
    flax_file = tmp_path / "flax.msgpack"
    parity.write_checkpoint(flax_file, variables, "linen")
    assert main(["convert", str(flax_file), str(tmp_path / "out"), "--layout", "timm"]) == 0
    loaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert _same_tensors(loaded.state_dict(), model.state_dict())


def test_directory_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(parity.CheckpointError, match="model.safetensors or pytorch_model.bin; found neither"):
        parity.load_checkpoint(tmp_path / "empty", "linen")
    sd = parity.ArchSpec("BasicBlock", (1, 1, 1, 1), 3, False).torch_model().state_dict()
    (tmp_path / "hf").mkdir()
    parity.write_checkpoint(tmp_path / "hf" / "model.safetensors", sd, "torch")
    (tmp_path / "hf" / "config.json").write_text("[1, 2]")
    with pytest.raises(parity.CheckpointError, match="config.json: expected a JSON object"):
        parity.load_checkpoint(tmp_path / "hf", "torch")
    # A directory with a config.json of other weights is not given seed weights beside it.
    assert main(["convert", str(tmp_path / "hf" / "model.safetensors"), str(tmp_path / "hf")]) == 2
    assert "would not describe seed weights" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "hf" / "model.safetensors"), str(tmp_path / "f"), "--to", "linen"]) == 2
    assert "write Flax to a file" in capsys.readouterr().err


def test_a_trained_flax_model_exports_to_a_transformers_directory(tmp_path: Path) -> None:
    """resnet-train's export -> `resnet-parity convert --layout transformers` -> from_pretrained: same predictions.

    transformers' stem is always 7x7/2 with max-pool, so this run trains without the small stem.
    """
    from resnet_train import data
    from resnet_train.checkpoint import load_variables
    from resnet_train.config import TrainConfig
    from resnet_train.loop import fit

    tiny = dict(image_size=16, train_limit=64, test_fraction=0.05, batch_size=16, epochs=1, progress=False)
    config = TrainConfig(**tiny, small_stem=False, run_dir=str(tmp_path))
    result = fit(config)
    assert main(["convert", result["export"], str(tmp_path / "hf"), "--layout", "transformers"]) == 0
    hf = transformers.ResNetForImageClassification.from_pretrained(tmp_path / "hf")

    ds = data.load_digits(config.image_size, config.test_fraction)
    mean, std = np.asarray(ds.mean, np.float32), np.asarray(ds.std, np.float32)
    x = (ds.test_images[:64].astype(np.float32) / 255 - mean) / std
    variables = load_variables(result["checkpoint"])
    flax_logits = np.asarray(parity.arch_of(variables).flax_model().apply(variables, jnp.asarray(x), train=False))
    hf_logits = _logits(hf, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    assert _rel(hf_logits, flax_logits) < EVAL_RTOL_FP32
    np.testing.assert_array_equal(hf_logits.argmax(-1), flax_logits.argmax(-1))
