"""Faults of the converter found by hunting for them: each gives a sentence or the right result, never a wrong one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import parity
from parity.cli import main
from parity.conversion.convert import check_state_dict
from parity.conversion.hub import write_hub_dir
from resnet_flax import nnx as flax_nnx

TINY = ("BasicBlock", (1, 1, 1, 1))  # one block per stage: cheap, and every layout has it but timm's


def _state_dict(num_classes: int = 10, block_counts: tuple[int, ...] = TINY[1]) -> dict[str, torch.Tensor]:
    return parity.ArchSpec(TINY[0], block_counts, num_classes, False).torch_model().state_dict()


def _file(tmp_path: Path, name: str, num_classes: int) -> Path:
    path = tmp_path / name
    parity.write_checkpoint(path, _state_dict(num_classes), "torch")
    return path


# --- convert into a directory that holds another model --------------------------------------------


def test_convert_into_another_models_directory_needs_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ten, three = _file(tmp_path, "ten.safetensors", 10), _file(tmp_path, "three.safetensors", 3)
    out = tmp_path / "hf"
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(ten), str(tmp_path / "empty"), "--layout", "transformers"]) == 0
    assert main(["convert", str(ten), str(out), "--layout", "transformers"]) == 0
    torch.save(_state_dict(10), out / "pytorch_model.bin")  # the other model's weights in the other format
    (out / "README.md").write_text("the user's notes")
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    capsys.readouterr()

    assert main(["convert", str(three), str(out), "--layout", "transformers"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "config.json" in err and "model.safetensors" in err and "pytorch_model.bin" in err
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before

    assert main(["convert", str(three), str(out), "--layout", "transformers", "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    assert (out / "README.md").read_text() == "the user's notes"
    assert json.loads((out / "config.json").read_text())["id2label"].keys() == {"0", "1", "2"}
    assert parity.load_checkpoint(out, "torch").fc.out_features == 3
    # Seed names have no config.json: the transformers one, describing other names, goes with --overwrite.
    assert main(["convert", str(ten), str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "model.safetensors"]


# --- a hub config.json that disagrees with the weights' head --------------------------------------


@pytest.mark.parametrize(
    "layout, change, words",
    [
        ("transformers", lambda c: {**c, "id2label": {str(i): f"L{i}" for i in range(5)}}, "id2label has 5"),
        ("timm", lambda c: {**c, "num_classes": 1000}, "num_classes=1000"),
    ],
)
def test_a_hub_config_with_another_class_count_is_refused(tmp_path: Path, layout: str, change, words: str) -> None:
    weights = check_state_dict(_state_dict(10, (2, 2, 2, 2)))
    write_hub_dir(tmp_path / "hub", weights, layout)
    config = tmp_path / "hub" / "config.json"
    config.write_text(json.dumps(change(json.loads(config.read_text()))))
    with pytest.raises(parity.ConversionError) as e:
        parity.load_checkpoint(tmp_path / "hub", "torch")
    message = str(e.value)
    assert "config.json" in message and words in message and "10 classes" in message


# --- an NNX target keeps its dtypes ---------------------------------------------------------------


def test_torch_to_nnx_casts_to_the_targets_dtypes() -> None:
    sd = _state_dict(10)

    def target(dtype):
        return nnx.eval_shape(
            lambda: flax_nnx.ResNet(flax_nnx.BasicBlock, TINY[1], num_classes=10, param_dtype=dtype, rngs=nnx.Rngs(0))
        )

    model = parity.torch_to_nnx(sd, target=target(jnp.bfloat16))
    dtypes = {str(x.dtype) for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {"bfloat16"}
    assert model.conv1[1].num_batches_tracked.get_value().dtype == jnp.int32
    np.testing.assert_array_equal(
        np.asarray(model.fc.kernel.get_value().astype(jnp.float32)),
        sd["fc.weight"].T.to(torch.bfloat16).float().numpy(),
    )
    with pytest.raises(ValueError, match="param_dtype=float16.*bfloat16"):
        parity.torch_to_nnx(sd, target=target(jnp.bfloat16), param_dtype=jnp.float16)
    same = parity.torch_to_nnx(sd, target=target(jnp.bfloat16), param_dtype=jnp.bfloat16)
    assert same.fc.kernel.get_value().dtype == jnp.bfloat16


# --- write_checkpoint checks the object against the framework named -------------------------------


def test_write_checkpoint_refuses_an_object_of_another_framework(tmp_path: Path) -> None:
    sd = _state_dict(10)
    variables = parity.torch_to_flax(sd)
    model = parity.torch_to_nnx(sd)
    path = tmp_path / "c.safetensors"
    for obj, framework, words in [
        (sd, "linen", r"Flax variables .*got a dict of torch.Tensor"),
        (sd, "flax", r"Flax variables .*got a dict of torch.Tensor"),
        (variables, "torch", r"a torch state dict .*got Flax variables \(batch_stats, params\) \(linen weights"),
        (model, "torch", r"a torch state dict .*got ResNet \(nnx weights"),
        (model, "linen", r"Flax variables .*got ResNet"),
        (sd, "nnx", r"an NNX model .*got a dict of torch.Tensor \(torch weights: pass framework='torch'\)"),
        (None, "torch", r"a torch state dict .*got NoneType"),
        (None, "linen", r"Flax variables .*got NoneType"),
    ]:
        with pytest.raises(TypeError, match=f"c.safetensors: {framework} .* {words}"):
            parity.write_checkpoint(path, obj, framework)
        assert not path.exists()
    with pytest.raises(TypeError, match="path must be a file name .*got NoneType"):
        parity.write_checkpoint(None, sd, "torch")  # type: ignore[arg-type]


# --- files of ours whose metadata names are damaged ------------------------------------------------


def _flip_bit(data: bytes, word: bytes, index: int) -> bytes:
    """data with one bit of ``word``'s byte at ``index`` flipped, at every place ``word`` occurs."""
    changed = bytes([*word[:index], word[index] ^ 1, *word[index + 1 :]])
    assert word in data
    return data.replace(word, changed)


def test_our_safetensors_file_with_both_metadata_names_flipped_is_corrupted(tmp_path: Path) -> None:
    path = _file(tmp_path, "t.safetensors", 10)
    data = _flip_bit(_flip_bit(path.read_bytes(), b'"framework"', 5), b'"sha256"', 3)
    path.write_bytes(data)
    with pytest.raises(parity.CheckpointError, match="t.safetensors: corrupted: its sha256 digest is missing"):
        parity.read_checkpoint(path)
    assert main(["convert", str(path), str(tmp_path / "out.msgpack")]) == 2


def test_our_pth_file_whose_entry_name_is_damaged_is_corrupted(tmp_path: Path) -> None:
    from parity.conversion.files import DIGEST_ENTRY

    path = _file(tmp_path, "t.pth", 10)
    sd = torch.load(path, weights_only=True)
    sd._metadata["_resnet_parjty"] = sd._metadata.pop(DIGEST_ENTRY)
    sd._metadata["_resnet_parjty"]["frameworj"] = sd._metadata["_resnet_parjty"].pop("framework")
    torch.save(sd, path)
    with pytest.raises(parity.CheckpointError, match="t.pth: corrupted: its sha256 digest is missing"):
        parity.read_checkpoint(path)


# --- sentences instead of Python's own errors ------------------------------------------------------


@pytest.mark.parametrize("framework", ["torch", "linen", "nnx"])
def test_load_checkpoint_takes_the_class_count_from_the_weights(tmp_path: Path, framework: str) -> None:
    path = _file(tmp_path, "w.safetensors", 10)
    with pytest.raises(parity.ConversionError, match=r"w.safetensors: num_classes=5 .* the weights have 10"):
        parity.load_checkpoint(path, framework, num_classes=5)
    with pytest.raises(parity.ConversionError, match=r"small_stem=True .* the weights have False"):
        parity.load_checkpoint(path, framework, small_stem=True)
    if framework == "nnx":
        with pytest.raises(parity.ConversionError, match=r"^num_classes=5 where the weights have 10"):
            parity.torch_to_nnx(_state_dict(10), num_classes=5)
    loaded = parity.load_checkpoint(path, framework, num_classes=10)  # what the weights say: accepted
    weights = {"torch": lambda: loaded, "linen": lambda: loaded[1], "nnx": lambda: parity.nnx_to_linen(loaded)}
    assert parity.arch_of(weights[framework]()).num_classes == 10


def test_an_abstract_nnx_model_has_no_values_to_convert(tmp_path: Path) -> None:
    abstract = nnx.eval_shape(lambda: flax_nnx.ResNet(flax_nnx.BasicBlock, TINY[1], num_classes=10, rngs=nnx.Rngs(0)))
    for convert in (parity.nnx_to_torch, parity.nnx_to_linen):
        with pytest.raises(parity.ConversionError, match=r"abstract \(built with nnx.eval_shape"):
            convert(abstract)
    with pytest.raises(parity.ConversionError, match=r"abstract \(built with nnx.eval_shape"):
        parity.write_checkpoint(tmp_path / "a.safetensors", abstract, "nnx")
    assert not (tmp_path / "a.safetensors").exists()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".msgpack"])
def test_an_empty_file_says_it_is_empty(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(parity.CheckpointError, match=f"empty{suffix}: .*the file is empty$"):
        parity.read_checkpoint(path)


def test_the_command_line_names_its_flag_and_the_api_its_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sd = _state_dict(10)
    sd["fc.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(sd, path)
    assert main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "--bad-values warn" in err and "bad_values=" not in err
    with pytest.raises(parity.ConversionError, match="bad_values='warn'"):
        parity.torch_to_flax(sd)
