"""Checks of single rules: which parameters ``--freeze bn`` fixes, which configurations TrainConfig refuses
where they enter, and which Flax-only speed levers a model refuses for a stem they cannot apply to."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import resnet_flax
import resnet_flax.nnx as resnet_nnx
from resnet_train.config import TrainConfig
from resnet_train.optim import BACKBONE_GROUP, FROZEN_GROUP, param_groups

TINY = (1, 1, 1, 1)


def linen_se_params() -> dict:
    model = resnet_flax.ResNet(resnet_flax.BasicBlock, TINY, num_classes=3, small_stem=True, se=True)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False))
    return shapes["params"]


def nnx_se_params() -> nnx.State:
    make = lambda: resnet_nnx.ResNet(  # noqa: E731
        resnet_nnx.BasicBlock, TINY, num_classes=3, small_stem=True, se=True, rngs=nnx.Rngs(0)
    )
    return nnx.state(nnx.eval_shape(make), nnx.Param)


@pytest.mark.parametrize("params", [linen_se_params, nnx_se_params], ids=["linen", "nnx"])
def test_freeze_bn_freezes_batchnorm_scale_and_bias_but_not_squeeze_excite_biases(params):
    config = TrainConfig(init_from="weights.pth", freeze="bn", small_stem=True)
    flat = jax.tree_util.tree_flatten_with_path(param_groups(config)(params()))[0]
    groups = {"/".join(str(getattr(e, "key", "")) for e in path).strip("/"): g for path, g in flat}
    se_biases = [name for name in groups if "/se/" in name and name.endswith("bias")]
    bn_leaves = [name for name in groups if name.startswith("conv1/1/")]
    assert len(se_biases) == 2 * len(TINY), groups
    assert sorted(bn_leaves) == ["conv1/1/bias", "conv1/1/scale"], groups
    assert all(groups[name] == BACKBONE_GROUP for name in se_biases), groups
    assert all(groups[name] == FROZEN_GROUP for name in bn_leaves), groups


@pytest.mark.parametrize(
    "arch, layout, words",
    [
        ("resnext50_32x4d", "transformers", "resnext50_32x4d .* has no transformers layout"),
        ("resnet50d", "torchvision", "resnet50d .* has no torchvision layout.*timm layout"),
        ("seresnet50", "torchvision", "seresnet50 .* has no torchvision layout"),
    ],
)
def test_an_export_layout_that_cannot_hold_the_variant_is_refused_by_the_config(arch, layout, words):
    with pytest.raises(ValueError, match=f"--export-layout {layout} cannot hold --arch {arch}: {words}"):
        TrainConfig(arch=arch, small_stem=False, export_layout=layout)


def test_torchvision_export_holds_resnext():
    assert TrainConfig(arch="resnext50_32x4d", small_stem=False, export_layout="torchvision").arch == "resnext50_32x4d"


def test_a_deep_stem_arch_with_the_small_stem_is_refused_by_the_config():
    with pytest.raises(ValueError, match="--arch resnet50d has its own .*stem.*needs --no-small-stem"):
        TrainConfig(arch="resnet50d")
    assert TrainConfig(arch="resnet50d", small_stem=False).arch == "resnet50d"


def test_an_init_from_disagreement_blames_the_preset_that_set_the_arch(tmp_path):
    import torch

    import resnet_torch
    from resnet_train.config import UsageError, parse_args

    torch.save(resnet_torch.build("resnet18", num_classes=3).state_dict(), tmp_path / "r18.pth")
    flags = ["--preset", "imagenet-resnet50", "--init-from", str(tmp_path / "r18.pth"), "--data-dir", str(tmp_path)]
    with pytest.raises(UsageError) as refused:
        parse_args(flags)
    assert "--preset imagenet-resnet50's --arch resnet50 disagrees" in refused.value.message
    with pytest.raises(UsageError) as refused:
        parse_args([*flags, "--arch", "resnet50"])
    assert "resnet18" in refused.value.message and ": --arch resnet50 disagrees" in refused.value.message


@pytest.mark.parametrize(
    "options, words",
    [
        ({"space_to_depth_stem": True, "small_stem": True}, "space_to_depth_stem applies to the default 7x7/2 stem"),
        ({"space_to_depth_stem": True, "stem": "deep"}, "space_to_depth_stem .* has the deep stem"),
        ({"max_pool_argmax_grad": True, "small_stem": True}, "max_pool_argmax_grad .* small stem .* has none"),
    ],
)
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_a_stem_lever_the_stem_has_no_place_for_is_refused(api, options, words):
    with pytest.raises(ValueError, match=words):
        if api == "linen":
            resnet_flax.ResNet(resnet_flax.BasicBlock, TINY, num_classes=3, **options)
        else:
            resnet_nnx.ResNet(resnet_nnx.BasicBlock, TINY, num_classes=3, **options, rngs=nnx.Rngs(0))


HF_PRE = {"size": {"shortest_edge": 12}, "crop_pct": 0.75, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}
TIMM_CFG = {"input_size": [3, 12, 12], "crop_pct": 0.75, "mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.mark.parametrize(
    "files, resample",
    [
        ({"preprocessor_config.json": {**HF_PRE, "resample": 3}, "config.json": {}}, 3),
        ({"config.json": {"pretrained_cfg": {**TIMM_CFG, "interpolation": "bicubic"}}}, 3),
        ({"config.json": {"pretrained_cfg": TIMM_CFG}}, 2),
    ],
    ids=["transformers", "timm", "default"],
)
def test_predict_resizes_with_the_filter_the_model_records(tmp_path, files, resample):
    import json

    import numpy as np
    from PIL import Image

    from parity.commands.predict import load_image, model_info

    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    pre = model_info(tmp_path).preprocessing
    assert pre is not None and pre.resample == resample
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (23, 29, 3), np.uint8)).save(tmp_path / "x.png")
    got = load_image(tmp_path / "x.png", pre)
    image = Image.open(tmp_path / "x.png").convert("RGB")
    filter_ = resample
    resized = {f: np.asarray(image.resize((20, 16), f), np.float32)[2:14, 4:16] / 255.0 for f in (filter_, 2)}
    assert np.allclose(got, (resized[filter_] - 0.5) / 0.25, atol=1e-6)
    assert filter_ == 2 or not np.allclose(resized[filter_], resized[2], atol=1e-3)  # the filter shows


def test_a_run_export_is_its_hub_directory_when_it_wrote_one_else_its_file(tmp_path):
    from parity.conversion.exports import EXPORT_DIR, EXPORT_FILE, RUN_MARKER, run_export

    assert run_export(tmp_path) == tmp_path  # no run directory: the path itself
    (tmp_path / RUN_MARKER).write_text("")
    assert run_export(tmp_path) is None
    (tmp_path / EXPORT_FILE).write_bytes(b"")
    assert run_export(tmp_path) == tmp_path / EXPORT_FILE
    (tmp_path / EXPORT_DIR).mkdir()
    assert run_export(tmp_path) == tmp_path / EXPORT_DIR
