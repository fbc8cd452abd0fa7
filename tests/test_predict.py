"""resnet-parity predict: the same answer from every framework, and a sentence for every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import resnet_torch
from parity.cli import main as parity_main
from parity.commands.args import EXIT_BAD_INPUT


def predict(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = parity_main(["predict", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), np.uint8)).save(folder / f"{i}.png")
    return folder


def test_every_framework_gives_the_same_answer(straight, images, capsys):
    config, _ = straight
    answers = {}
    for framework in ("torch", "flax", "nnx"):
        code, out, err = predict(capsys, config.run_dir, images, "--json", "--top-k", "3", "--framework", framework)
        assert code == 0, err
        answers[framework] = json.loads(out)["predictions"]
    reference = answers.pop("torch")
    assert [p["image"] for p in reference] == [str(images / "0.png"), str(images / "1.png")]
    for predictions in answers.values():
        for got, want in zip(predictions, reference, strict=True):
            assert [t["class"] for t in got["top_k"]] == [t["class"] for t in want["top_k"]]
            assert np.allclose(
                [t["probability"] for t in got["top_k"]], [t["probability"] for t in want["top_k"]], atol=1e-5
            )
    assert all(t["class"] in config_classes(config) for p in reference for t in p["top_k"])
    code, out, _ = predict(capsys, config.run_dir, images / "0.png", "--top-k", "2")
    assert code == 0 and out.splitlines()[0] == str(images / "0.png") and out.splitlines()[1].startswith("  1. ")


def config_classes(config) -> list[str]:
    return json.loads((Path(config.run_dir) / "config.json").read_text())["class_names"]


def test_bad_inputs_get_a_sentence(straight, images, tmp_path, capsys):
    config, _ = straight
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.png").write_text("not an image")
    torch.save(resnet_torch.resnet18().state_dict(), tmp_path / "bare.pth")
    cases = {
        (config.run_dir, tmp_path / "notes.png"): "notes.png",
        (config.run_dir, tmp_path / "empty"): "a folder with no image files",
        (config.run_dir, tmp_path / "missing.png"): "no such file or folder",
        (tmp_path / "bare.pth", images): "records no class names",
    }
    for argv, expected in cases.items():
        code, out, err = predict(capsys, *argv)
        assert code == EXIT_BAD_INPUT and out == ""
        assert err.startswith("resnet-parity predict: error: ") and expected in err and len(err.splitlines()) == 1
