"""Fine-tuning: resnet-train --init-from torchvision and transformers weights, --freeze, the export in the
source's layout with the image folder's class names, and resuming without the source."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
import torchvision
from PIL import Image

from resnet_train import main as train_main

# Three classes of solid colours with noise: separable by any features, so a few steps learn them.
COLOURS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}
CLASSES = sorted(COLOURS)
SIDE = 20  # the files' side; training crops 16
SIZE = 16
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 4


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


def randomise_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Running statistics and counters far from a fresh BatchNorm's, so keeping them is a real check."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
                m.num_batches_tracked.fill_(1234)
    return model


def train(*flags: str) -> tuple[int, dict]:
    """resnet-train in this process on tiny settings: (exit status, its JSON line)."""
    out = io.StringIO()
    argv = ["--dataset", "imagefolder", "--image-size", str(SIZE), "--batch-size", "8", "--workers", "0"]
    argv += ["--no-progress", "--log-every", "0", "--warmup-epochs", "0", *flags]
    with contextlib.redirect_stdout(out):
        code = train_main.main(argv)
    return code, json.loads(out.getvalue().splitlines()[-1])


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
def probe(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> tuple[dict, Path, dict]:
    """A torchvision resnet18 (5 classes, randomised BatchNorm) saved as .pth, linear-probed on the folder."""
    tmp = tmp_path_factory.mktemp("probe")
    torch.manual_seed(0)
    source = randomise_batchnorm(torchvision.models.resnet18(num_classes=5)).state_dict()
    torch.save(source, tmp / "tv18.pth")
    code, result = train(
        "--data-dir",
        str(folder),
        "--init-from",
        str(tmp / "tv18.pth"),
        "--freeze",
        "backbone",
        "--epochs",
        "4",
        "--lr",
        "0.5",
        "--run-dir",
        str(tmp / "run"),
    )
    assert code == 0, result
    return source, tmp / "run", result


def test_linear_probe_keeps_the_backbone_bit_identical_and_exports_for_torchvision(probe):
    source, run, result = probe
    exported = safetensors.torch.load_file(run / "model.safetensors")
    assert set(exported) == set(source)
    backbone = [k for k in source if not k.startswith("fc.")]
    assert all(exported[k].dtype == source[k].dtype and torch.equal(exported[k], source[k]) for k in backbone)
    assert not torch.equal(exported["fc.weight"][:3], source["fc.weight"][:3])
    assert exported["fc.weight"].shape == (len(CLASSES), 512)
    assert result["test_accuracy"] >= 0.9  # chance is 1/3
    model = torchvision.models.resnet18(num_classes=len(CLASSES))
    model.load_state_dict(exported, strict=True)
    meta = metadata(run / "model.safetensors")
    assert meta["class_names"] == CLASSES and meta["layout"] == "torchvision"
    saved = json.loads((run / "config.json").read_text())
    assert saved["arch"] == "resnet18" and saved["small_stem"] is False
    assert saved["init_from_source"]["layout"] == "torchvision"
    import hashlib

    assert saved["init_from_source"]["sha256"] == hashlib.sha256(Path(saved["init_from"]).read_bytes()).hexdigest()


def test_init_from_weights_of_another_architecture_is_refused(probe, folder, tmp_path, capsys):
    source_file = Path(json.loads((probe[1] / "config.json").read_text())["init_from"])
    code, result = train(
        "--data-dir",
        str(folder),
        "--init-from",
        str(source_file),
        "--arch",
        "resnet50",
        "--run-dir",
        str(tmp_path / "run"),
    )
    assert code == 2
    assert "resnet18" in result["error"] and "--arch resnet50 disagrees" in result["error"]
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> tuple[dict, Path, dict]:
    """A transformers directory (resnet18, 3 classes, randomised BatchNorm) fine-tuned with --freeze bn on NNX,
    stopped after an epoch, its source deleted, then resumed to the end."""
    import parity
    from parity.conversion.hub import write_hub_dir

    tmp = tmp_path_factory.mktemp("hub")
    torch.manual_seed(1)
    model = randomise_batchnorm(torchvision.models.resnet18(num_classes=len(CLASSES)))
    source, _ = write_hub_dir(tmp / "src", parity.conversion.convert.check_state_dict(model), "transformers")
    common = ["--data-dir", str(folder), "--init-from", str(tmp / "src"), "--freeze", "bn", "--api", "nnx"]
    common += ["--epochs", "2", "--lr", "0.05", "--run-dir", str(tmp / "run")]
    code, first = train(*common, "--stop-after-epoch", "1")
    assert code == 0, first
    shutil.rmtree(tmp / "src")  # a resumed run does not read its source again
    code, result = train(*common, "--resume")
    assert code == 0, result
    return {k: t.clone() for k, t in source.items()}, tmp / "run", result


def test_transformers_directory_round_trip_with_frozen_batchnorm(hub_run):
    from transformers import ResNetForImageClassification

    import parity
    from resnet_train.checkpoint import load_variables

    source, run, result = hub_run
    assert result["steps"] == 6 and Path(result["export"]) == run / "model"
    exported = safetensors.torch.load_file(run / "model" / "model.safetensors")
    norms = [k for k in source if ".normalization." in k]
    assert norms and all(torch.equal(exported[k], source[k]) for k in norms)  # statistics, counters, scale, bias
    assert any(not torch.equal(exported[k], source[k]) for k in source if k.endswith("convolution.weight"))
    hf = ResNetForImageClassification.from_pretrained(run / "model").eval()
    assert hf.config.id2label == dict(enumerate(CLASSES)) and hf.config.label2id == {
        c: i for i, c in enumerate(CLASSES)
    }
    assert metadata(run / "model" / "model.safetensors")["class_names"] == CLASSES
    # The transformers model predicts as the Flax model the run trained.
    x = np.random.default_rng(0).normal(size=(4, SIZE, SIZE, 3)).astype(np.float32)
    variables = load_variables(result["checkpoint"])
    flax_logits = np.asarray(parity.arch_of(variables).flax_model().apply(variables, x, train=False))
    with torch.no_grad():
        hf_logits = hf(torch.from_numpy(x).permute(0, 3, 1, 2)).logits.numpy()
    assert np.linalg.norm(hf_logits - flax_logits) <= 1e-5 * np.linalg.norm(flax_logits)


def test_predict_names_the_colour_from_the_run_and_from_its_transformers_directory(probe, hub_run, tmp_path, capsys):
    from parity.cli import main as parity_main

    rng = np.random.default_rng(5)
    for name in CLASSES:
        colour_image(COLOURS[name], rng).resize((31, 24)).save(tmp_path / f"{name}.jpg")
    for model in (probe[1], hub_run[1] / "model"):
        assert parity_main(["predict", str(model), str(tmp_path), "--json", "--top-k", "1"]) == 0
        predictions = json.loads(capsys.readouterr().out)["predictions"]
        assert [p["top_k"][0]["class"] for p in predictions] == CLASSES, model
