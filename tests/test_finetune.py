"""Fine-tuning: resnet-train --init-from a DataParallel .pth, a transformers directory and a timm directory,
--freeze, --backbone-lr-scale, the export in the source's layout with the image folder's class names, and
resuming without the source.

Three short runs share one image folder and one batch and image size, so the evaluation and export-check
programs compile once: a linear probe (linen), a full fine-tune stopped after its first step and resumed
(linen), and a frozen-BatchNorm fine-tune (NNX).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors
import safetensors.torch
import torch
import torchvision
from PIL import Image

import parity
import parity.conversion.files as conversion_files
from parity.conversion.convert import check_state_dict
from parity.conversion.hub import write_hub_dir
from resnet_arch import HEAD, STEM
from resnet_train import main as train_main
from resnet_train.config import TrainConfig
from resnet_train.optim import make_optimizer

# Three classes of solid colours with noise: separable by any features, so a few steps learn them.
COLOURS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}
CLASSES = sorted(COLOURS)
SIDE = 10  # the files' side; training crops 8
SIZE = 8
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 4
BATCH = 8  # three steps an epoch; --train-limit BATCH makes it one


def colour_image(rgb: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    """A noisy solid-colour image."""
    return Image.fromarray(np.clip(np.array(rgb) + rng.normal(0, 20, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8))


def make_folder(root: Path) -> Path:
    """An image folder with train/ and val/ splits of the three colour classes."""
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for name, rgb in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                colour_image(rgb, rng).save(folder / f"{i}.png")
    return root


def randomised_resnet18(num_classes: int, seed: int) -> torch.nn.Module:
    """A torchvision resnet18 whose BatchNorm statistics, counters and affine parameters are far from a fresh
    one's, so keeping them is a real check."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
                m.num_batches_tracked.fill_(1234)
    return model


def train(*flags: str) -> tuple[int, dict, str]:
    """resnet-train in this process on tiny settings: (exit status, its JSON line, its log on stderr)."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["--dataset", "imagefolder", "--image-size", str(SIZE), "--batch-size", str(BATCH), "--workers", "0"]
    argv += ["--no-progress", "--log-every", "0", "--warmup-epochs", "0", *flags]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train_main.main(argv)
    return code, json.loads(out.getvalue().splitlines()[-1]), err.getvalue()


def metadata(path: Path) -> dict:
    with safetensors.safe_open(str(path), "np") as f:
        return {
            k: json.loads(v) if k not in ("format", "framework", "sha256", "_resnet_parity") else v
            for k, v in (f.metadata() or {}).items()
        }


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> tuple[dict, Path, dict, str, list[Path]]:
    """A torchvision resnet18 (5 classes, randomised BatchNorm) saved by DataParallel (``module.`` keys) as .pth,
    linear-probed on the folder; the files the run read its source from."""
    tmp = tmp_path_factory.mktemp("probe")
    source = randomised_resnet18(5, 0).state_dict()
    torch.save({f"module.{k}": t for k, t in source.items()}, tmp / "tv18.pth")
    reads: list[Path] = []
    read_checkpoint = conversion_files.read_checkpoint

    def counted(path, *args, **kwargs):
        reads.append(Path(path))
        return read_checkpoint(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conversion_files, "read_checkpoint", counted)
        code, result, log = train(
            *("--data-dir", str(folder), "--init-from", str(tmp / "tv18.pth"), "--freeze", "backbone"),
            *("--epochs", "2", "--lr", "0.1", "--run-dir", str(tmp / "run")),
        )
    assert code == 0, result
    return source, tmp / "run", result, log, [p for p in reads if p == tmp / "tv18.pth"]


def test_linear_probe_keeps_the_backbone_bit_identical_and_exports_for_torchvision(probe):
    source, run, result, _, _ = probe
    exported = safetensors.torch.load_file(run / "model.safetensors")
    assert set(exported) == set(source)
    backbone = [k for k in source if not k.startswith("fc.")]
    assert all(exported[k].dtype == source[k].dtype and torch.equal(exported[k], source[k]) for k in backbone)
    assert not torch.equal(exported["fc.weight"][:3], source["fc.weight"][:3])
    assert exported["fc.weight"].shape == (len(CLASSES), 512)
    assert result["test_accuracy"] >= 0.9  # chance is 1/3
    torchvision.models.resnet18(num_classes=len(CLASSES)).load_state_dict(exported, strict=True)
    meta = metadata(run / "model.safetensors")
    assert meta["class_names"] == CLASSES and meta["layout"] == "torchvision"
    saved = json.loads((run / "config.json").read_text())
    assert saved["arch"] == "resnet18" and saved["small_stem"] is False
    assert saved["init_from_source"]["layout"] == "torchvision"
    assert saved["init_from_source"]["sha256"] == hashlib.sha256(Path(saved["init_from"]).read_bytes()).hexdigest()


def test_a_dataparallel_source_is_read_once_and_its_prefix_is_one_log_line(probe):
    # Tests run with warnings as errors: the converter's warning about the prefix reached no one as a warning.
    _, _, _, log, reads = probe
    assert [line for line in log.splitlines() if "module." in line] == [
        f"--init-from {reads[0]}: stripped 'module.' (DataParallel/DistributedDataParallel) from every key"
    ]
    assert len(reads) == 1  # at flag parsing, for the architecture; setup takes those weights


def test_init_from_weights_of_another_architecture_is_refused(probe, folder, tmp_path):
    source_file = Path(json.loads((probe[1] / "config.json").read_text())["init_from"])
    code, result, _ = train(
        *("--data-dir", str(folder), "--init-from", str(source_file), "--arch", "resnet50"),
        *("--run-dir", str(tmp_path / "run")),
    )
    assert code == 2
    assert "resnet18" in result["error"] and "--arch resnet50 disagrees" in result["error"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("layout", ["torchvision", "timm", "transformers"])
def test_an_export_layout_without_a_small_stem_is_refused_at_the_flags(layout, capsys):
    code = train_main.main(["--export-layout", layout, "--small-stem", "--run-dir", "unused"])
    assert code == 2
    error = json.loads(capsys.readouterr().out.splitlines()[-1])["error"]
    assert f"--export-layout {layout} cannot hold" in error and "small stem" in error and "--no-small-stem" in error
    assert not Path("unused").exists()


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> tuple[dict, Path, dict]:
    """A transformers directory (resnet18, 3 classes, randomised BatchNorm) fully fine-tuned, stopped after its
    first step, its source deleted, then resumed to the end."""
    tmp = tmp_path_factory.mktemp("hub")
    model = randomised_resnet18(len(CLASSES), 1)
    source, _ = write_hub_dir(tmp / "src", check_state_dict(model), "transformers")
    common = ["--data-dir", str(folder), "--init-from", str(tmp / "src"), "--freeze", "none"]
    common += ["--epochs", "2", "--train-limit", str(BATCH), "--lr", "0.05", "--run-dir", str(tmp / "run")]
    code, first, _ = train(*common, "--stop-after-epoch", "1")
    assert code == 0 and first["steps"] == 1, first
    shutil.rmtree(tmp / "src")  # a resumed run does not read its source again
    code, result, _ = train(*common, "--resume")
    assert code == 0, result
    return {k: t.clone() for k, t in source.items()}, tmp / "run", result


def test_full_fine_tune_of_a_transformers_directory_exports_one_transformers_loads(hub_run):
    from transformers import AutoImageProcessor, ResNetForImageClassification

    from parity.commands.predict import _hub_preprocessing, _recorded
    from resnet_train.checkpoint import load_variables

    source, run, result = hub_run
    assert result["steps"] == 2 and Path(result["export"]) == run / "model"
    exported = safetensors.torch.load_file(run / "model" / "model.safetensors")
    assert set(exported) == set(source)
    changed = [k for k in source if source[k].is_floating_point() and not torch.equal(exported[k], source[k])]
    assert any(k.endswith("convolution.weight") for k in changed)  # the backbone trained
    assert any(k.endswith("normalization.running_mean") for k in changed)  # BatchNorm in train mode
    hf = ResNetForImageClassification.from_pretrained(run / "model").eval()
    assert hf.config.id2label == dict(enumerate(CLASSES))
    assert hf.config.label2id == {c: i for i, c in enumerate(CLASSES)}
    assert metadata(run / "model" / "model.safetensors")["class_names"] == CLASSES
    # The transformers model predicts as the Flax model the run trained.
    x = np.random.default_rng(0).normal(size=(4, SIZE, SIZE, 3)).astype(np.float32)
    variables = load_variables(result["checkpoint"])
    want = np.asarray(parity.arch_of(variables).flax_model().apply(variables, x, train=False))
    with torch.no_grad():
        got = hf(torch.from_numpy(x).permute(0, 3, 1, 2)).logits.numpy()
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
    # Its image processor, read offline, prepares an image as the run evaluates it.
    processor = AutoImageProcessor.from_pretrained(run / "model")
    meta = metadata(run / "model" / "model.safetensors")
    assert list(processor.image_mean) == meta["mean"] and list(processor.image_std) == meta["std"]
    pixels = processor(Image.new("RGB", (31, 24), (255, 0, 0)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, SIZE, SIZE)
    assert np.allclose(pixels[0, :, 0, 0], (np.array([1.0, 0.0, 0.0]) - meta["mean"]) / meta["std"], atol=1e-5)
    # predict reads the same transform from it as from the weights' metadata.
    assert _hub_preprocessing(run / "model", {}) == _recorded(meta)


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> tuple[dict, Path, dict]:
    """A timm directory (resnet18, 4 classes, randomised BatchNorm) fine-tuned with --freeze bn on NNX."""
    tmp = tmp_path_factory.mktemp("timm")
    model = randomised_resnet18(4, 2)
    source, _ = write_hub_dir(tmp / "src", check_state_dict(model), "timm")
    code, result, _ = train(
        *("--data-dir", str(folder), "--init-from", str(tmp / "src"), "--freeze", "bn", "--api", "nnx"),
        *("--epochs", "1", "--train-limit", str(BATCH), "--lr", "0.05", "--run-dir", str(tmp / "run")),
    )
    assert code == 0, result
    return {k: t.clone() for k, t in source.items()}, tmp / "run", result


def test_frozen_batchnorm_on_nnx_keeps_every_statistic_and_exports_a_timm_directory(timm_run):
    import timm

    source, run, result = timm_run
    assert Path(result["export"]) == run / "model"
    exported = safetensors.torch.load_file(run / "model" / "model.safetensors")
    assert set(exported) == set(source)
    norms = [k for k in source if ".bn" in k or k.startswith("bn1.") or ".downsample.1." in k]
    assert len(norms) == 20 * 5  # 20 BatchNorms: statistics, counter, scale and bias each
    assert all(torch.equal(exported[k], source[k]) for k in norms)
    assert any(not torch.equal(exported[k], source[k]) for k in source if k.endswith("conv1.weight"))
    model = timm.create_model(f"local-dir:{run / 'model'}", pretrained=True).eval()
    assert model.pretrained_cfg["label_names"] == CLASSES and model.num_classes == len(CLASSES)
    x = np.random.default_rng(1).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    with torch.no_grad():
        got = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    reference = parity.load_checkpoint(run / "model", "torch")
    with torch.no_grad():
        want = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert np.allclose(got, want, atol=1e-5)


def optimizer(**fields) -> optax.GradientTransformation:
    config = TrainConfig(optimizer="sgd", nesterov=False, warmup_epochs=0, epochs=1, lr=0.1, **fields)
    return make_optimizer(config, steps_per_epoch=10)


# A network's parameter kinds, under the model's names: a kernel, a BatchNorm scale and bias, and the classifier.
PARAMS = {
    STEM: {"kernel": jnp.full((3, 3, 3, 4), 0.5)},
    "bn1": {"scale": jnp.full((4,), 2.0), "bias": jnp.full((4,), 0.25)},
    HEAD: {"kernel": jnp.full((4, 3), 0.5), "bias": jnp.full((3,), 0.25)},
}


def first_update(tx: optax.GradientTransformation, grads) -> dict:
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    return updates


def test_backbone_lr_scale_scales_the_backbone_update_only():
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    plain = first_update(optimizer(momentum=0.0, weight_decay=0.0), grads)
    scaled = first_update(optimizer(momentum=0.0, weight_decay=0.0, backbone_lr_scale=0.25), grads)
    for module in PARAMS:
        factor = 1.0 if module == HEAD else 0.25
        for name in PARAMS[module]:
            assert np.allclose(scaled[module][name], factor * plain[module][name]), (module, name)
            assert np.all(plain[module][name] == -0.1)


@pytest.mark.parametrize("freeze", ["bn", "backbone"])
def test_frozen_parameters_get_no_decay_no_update_and_no_optimizer_state(freeze):
    tx = optimizer(momentum=0.9, weight_decay=0.5, decay_bn_bias=True, init_from="weights.pth", freeze=freeze)
    frozen = {("bn1", "scale"), ("bn1", "bias")}
    if freeze == "backbone":
        frozen.add((STEM, "kernel"))
    zero = jax.tree.map(jnp.zeros_like, PARAMS)
    updates = first_update(tx, zero)  # what weight decay alone does
    for module, leaves in PARAMS.items():
        for name in leaves:
            moved = bool(np.any(updates[module][name] != 0))
            assert moved == ((module, name) not in frozen), (module, name)
    # Momentum buffers for the trained parameters only.
    state_sizes = sorted(leaf.size for leaf in jax.tree.leaves(tx.init(PARAMS)) if leaf.ndim > 0)
    trained = sorted(PARAMS[m][n].size for m in PARAMS for n in PARAMS[m] if (m, n) not in frozen)
    assert state_sizes == trained


def test_predict_names_the_colour_and_answers_alike_from_a_run_and_its_transformers_directory(
    probe, hub_run, tmp_path, capsys
):
    from parity.cli import main as parity_main

    rng = np.random.default_rng(5)
    for name in CLASSES:
        colour_image(COLOURS[name], rng).resize((31, 24)).save(tmp_path / f"{name}.jpg")

    def predict(model: Path) -> list[dict]:
        assert parity_main(["predict", str(model), str(tmp_path), "--json", "--top-k", "3"]) == 0
        return [p["top_k"] for p in json.loads(capsys.readouterr().out)["predictions"]]

    assert [top[0]["class"] for top in predict(probe[1])] == CLASSES
    from_run, from_directory = predict(hub_run[1]), predict(hub_run[1] / "model")
    for a, b in zip(from_run, from_directory, strict=True):
        assert [t["class"] for t in a] == [t["class"] for t in b]
        assert np.allclose([t["probability"] for t in a], [t["probability"] for t in b], atol=1e-5)
