"""resnet-parity export: ONNX and StableHLO artifacts of every depth, verified on write, run where they are served."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import parity
import resnet_torch
from parity import export as export_module
from parity.checks.pairs import randomize_batchnorm
from parity.cli import main
from parity.export import ONNX, STABLEHLO, ExportMismatchError, export
from resnet_arch import DEPTHS

SIZE = 32  # small, and even: the artifacts' spatial size is fixed at export
# XLA's CPU convolutions in float16/bfloat16 are slow: the half-precision artifacts are checked smaller.
HALF_SIZE = 16
CLASSES = ("cat", "dog", "owl")


def _checkpoint(tmp_path, arch: str = "resnet18", num_classes: int = 3):
    """A random resnet_torch model with random BatchNorm state, written with class names; (path, model)."""
    torch.manual_seed(1)
    model = resnet_torch.build(arch, num_classes=num_classes)
    randomize_batchnorm(model, torch.Generator().manual_seed(1))
    path = tmp_path / f"{arch}.safetensors"
    meta = {
        "class_names": json.dumps(list(CLASSES)[:num_classes]),
        "mean": "[0.5, 0.5, 0.5]",
        "std": "[0.25, 0.25, 0.25]",
    }
    parity.write_checkpoint(path, model.state_dict(), "torch", meta)
    return path, model.eval()


def _torch_logits(model: torch.nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


# resnet18 and resnet50 (each block kind) in both formats; resnet34 (more of resnet18's basic blocks) once, and
# resnet101 and resnet152 (more of resnet50's bottleneck blocks) once each, one per format, at the smallest size
# the standard stem takes down to 1x1 maps.
DEEP_SIZE = 16
DEPTH_CASES = [(fmt, arch, SIZE) for arch in ("resnet18", "resnet50") for fmt in (STABLEHLO, ONNX)]
DEPTH_CASES += [(ONNX, "resnet34", SIZE), (STABLEHLO, "resnet101", DEEP_SIZE), (ONNX, "resnet152", DEEP_SIZE)]


@pytest.fixture(scope="module")
def resnet18_artifacts(tmp_path_factory) -> tuple[torch.nn.Module, dict]:
    """resnet18's model and its artifact in each format at SIZE: (model, {fmt: (path, what export returned)})."""
    tmp = tmp_path_factory.mktemp("resnet18")
    path, model = _checkpoint(tmp)
    made = {}
    for fmt in (STABLEHLO, ONNX):
        out = tmp / f"m.{fmt}"
        made[fmt] = (out, export(path, out, fmt, image_size=SIZE))
    return model, made


def test_every_depth_is_covered() -> None:
    assert sorted({arch for _, arch, _ in DEPTH_CASES}) == sorted(DEPTHS)


@pytest.mark.parametrize(("fmt", "arch", "size"), DEPTH_CASES)
def test_every_depth_exports_verified_with_a_dynamic_batch(tmp_path, request, fmt, arch, size):
    """Verification runs the artifact at a batch of 3: the ONNX export traced a batch of 2, the StableHLO batch
    is symbolic, so each depth's artifact already ran at another batch size than it was made with."""
    if arch == "resnet18":
        model, made = request.getfixturevalue("resnet18_artifacts")
        out, done = made[fmt]
    else:
        path, model = _checkpoint(tmp_path, arch)
        out = tmp_path / f"m.{fmt}"
        done = export(path, out, fmt, image_size=size)
    assert done.rel_err <= 1e-5 and out.stat().st_size == done.size
    if arch != "resnet18":
        return
    x = np.random.default_rng(5).standard_normal((5, SIZE, SIZE, 3)).astype(np.float32)  # against torch, batch 5
    if fmt == ONNX:
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape[0] == "batch"
        got = session.run(None, {"images": np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0]
    else:
        got = jax.export.deserialize(bytearray(out.read_bytes())).call(jnp.asarray(x))
    assert _rel(got, _torch_logits(model, x)) < 1e-5


def test_the_stablehlo_file_runs_in_a_process_that_does_not_import_the_project(tmp_path, resnet18_artifacts):
    model, made = resnet18_artifacts
    out, _ = made[STABLEHLO]
    x = np.random.default_rng(6).standard_normal((4, SIZE, SIZE, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(
        f"""
        import sys, jax, numpy as np
        exported = jax.export.deserialize(bytearray(open({str(out)!r}, "rb").read()))
        np.save({str(tmp_path / "y.npy")!r}, np.asarray(exported.call(np.load({str(tmp_path / "x.npy")!r}))))
        mine = [m for m in sys.modules if m.split(".")[0] in ("parity", "resnet_flax", "resnet_torch", "resnet_arch")]
        assert not mine, mine
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env, timeout=300)
    assert _rel(np.load(tmp_path / "y.npy"), _torch_logits(model, x)) < 1e-5


@pytest.mark.parametrize("fmt", [STABLEHLO, ONNX])
def test_class_names_and_normalisation_travel_with_the_artifact(resnet18_artifacts, fmt):
    out, _ = resnet18_artifacts[1][fmt]
    if fmt == ONNX:
        facts = {p.key: json.loads(p.value) for p in onnx.load(str(out), load_external_data=False).metadata_props}
        layout = "NCHW"
    else:
        facts = json.loads(out.with_name(out.name + ".json").read_text())
        layout = "NHWC"
    assert facts["class_names"] == list(CLASSES)
    assert facts["mean"] == [0.5] * 3 and facts["std"] == [0.25] * 3
    assert facts["input"] == {"name": "images", "layout": layout, "dtype": "float32", "image_size": SIZE}


@pytest.mark.parametrize(("fmt", "dtype"), [(STABLEHLO, "bf16"), (STABLEHLO, "fp16"), (ONNX, "fp16")])
def test_half_precision_artifacts_meet_their_tolerance(tmp_path, fmt, dtype):
    path, _ = _checkpoint(tmp_path)
    done = export(path, tmp_path / f"m.{fmt}", fmt, dtype=dtype, image_size=HALF_SIZE)
    assert 1e-5 < done.rel_err <= export_module.TOLERANCES[dtype]  # rounded, but within its tolerance


def test_a_mismatch_removes_the_file_and_says_so(tmp_path, monkeypatch):
    path, _ = _checkpoint(tmp_path)
    real = export_module._relative_error
    monkeypatch.setattr(export_module, "_relative_error", lambda got, ref: 10 * real(got, ref) + 1.0)
    with pytest.raises(ExportMismatchError, match=r"m\.onnx: the onnx artifact's logits differ .* nothing was written"):
        export(path, tmp_path / "m.onnx", ONNX, image_size=SIZE)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_trained_run_exports_and_predicts_the_same_classes(straight, tmp_path, capsys):
    config, result = straight
    run = Path(config.run_dir)
    assert result["export"] == str(run / "model.safetensors")
    torch_model = parity.load_checkpoint(run / "model.safetensors", "torch")
    from sklearn.datasets import load_digits

    digits = load_digits().images[:40] / 16.0
    x = np.repeat(digits[..., None], 3, axis=-1).astype(np.float32)
    x = (x - np.float32(0.5)) / np.float32(0.25)
    expected = _torch_logits(torch_model, x).argmax(-1)
    for fmt in (STABLEHLO, ONNX):
        assert main(["export", str(run), str(tmp_path / f"m.{fmt}")]) == 0
    assert "verified: relative logit error" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    onnx_classes = session.run(None, {"images": np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0].argmax(-1)
    program = jax.export.deserialize(bytearray((tmp_path / "m.stablehlo").read_bytes()))
    stablehlo_classes = np.asarray(program.call(jnp.asarray(x))).argmax(-1)
    np.testing.assert_array_equal(onnx_classes, expected)
    np.testing.assert_array_equal(stablehlo_classes, expected)
    facts = json.loads((tmp_path / "m.stablehlo.json").read_text())
    assert facts["input"]["image_size"] == config.image_size == 8
    assert facts["class_names"] == [str(i) for i in range(10)]


@pytest.mark.parametrize(
    ("model", "out", "message"),
    [
        ("missing.pth", "m.onnx", "missing.pth: no such file"),
        ("bad.safetensors", "m.onnx", "bad.safetensors"),
        ("good", "nowhere/m.onnx", "nowhere is not an existing folder"),
        ("good", "m.txt", "say --format onnx|stablehlo"),
        ("good", "m.onnx --dtype bf16", "onnx takes --dtype fp32 or fp16, got 'bf16'"),
    ],
)
def test_bad_models_and_outputs_get_a_sentence_and_leave_nothing(tmp_path, capsys, model, out, message):
    good, _ = _checkpoint(tmp_path)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    source = good if model == "good" else tmp_path / model
    target, *flags = out.split()
    assert main(["export", str(source), str(tmp_path / target), "--image-size", str(SIZE), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resnet-parity export: error: ") and message in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
