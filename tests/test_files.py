"""Checkpoint files: round trips per format, one-call loading, refusals, corruption, atomic writes, the CLI."""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import pickle
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision
from flax import traverse_util
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import parity
import resnet_torch
from parity.checks.pairs import randomize_batchnorm
from parity.cli import main
from parity.conversion.atomic import atomic_write
from parity.conversion.files import DIGEST_ENTRY

RTOL_FP32 = 1e-5
ODD_SIZE = (33, 47)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _model(num_classes: int = 5) -> torch.nn.Module:
    model = resnet_torch.resnet18(num_classes=num_classes)
    randomize_batchnorm(model, torch.Generator().manual_seed(17))
    return model.eval()


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _same_tree(a, b) -> bool:
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    return fa.keys() == fb.keys() and all(
        np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype and np.array_equal(np.asarray(fa[k]), np.asarray(fb[k]))
        for k in fa
    )


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _model()


# --- round trips and one-call loading -------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_files_round_trip(tmp_path: Path, model: torch.nn.Module, suffix: str, dtype: torch.dtype) -> None:
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    size = parity.write_checkpoint(path, sd, "torch")
    assert size == path.stat().st_size > 0
    ckpt = parity.read_checkpoint(path)
    assert ckpt.framework == "torch" and _same_tensors(ckpt.tensors, sd)
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("suffix", [".safetensors", ".msgpack"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flax_files_round_trip(tmp_path: Path, model: torch.nn.Module, suffix: str, dtype: torch.dtype) -> None:
    variables = parity.torch_to_flax(model, param_dtype=dtype)
    path = tmp_path / f"v{suffix}"
    parity.write_checkpoint(path, variables, "linen")
    ckpt = parity.read_checkpoint(path)
    assert ckpt.framework == "linen" and _same_tree(ckpt.tensors, variables)


def test_flax_safetensors_key_scheme(tmp_path: Path, model: torch.nn.Module) -> None:
    from safetensors import safe_open

    path = tmp_path / "v.safetensors"
    parity.write_checkpoint(path, parity.torch_to_flax(model), "linen", {"arch": "resnet18"})
    with safe_open(path, framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        kernel = f.get_tensor("params/conv2_x/0/residual_function/0/kernel")
    assert "batch_stats/conv1/1/num_batches_tracked" in keys and "params/fc/bias" in keys
    assert meta["framework"] == "linen" and meta["arch"] == "resnet18" and len(meta["sha256"]) == 64
    torch.testing.assert_close(kernel, model.conv2_x[0].residual_function[0].weight.detach().permute(2, 3, 1, 0))


def test_float64_survives_safetensors(tmp_path: Path, model: torch.nn.Module) -> None:
    sd = {k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "w.safetensors"
    parity.write_checkpoint(path, sd, "torch")
    with jax.enable_x64(True):
        _, variables = parity.load_checkpoint(path, "linen")
        assert variables["params"]["fc"]["kernel"].dtype == jnp.float64
    assert parity.load_checkpoint(path, "torch").fc.weight.dtype == torch.float64


@pytest.mark.parametrize("source", ["torch.pth", "torch.safetensors", "linen.safetensors", "linen.msgpack"])
def test_load_checkpoint_gives_working_models_of_both_frameworks(
    tmp_path: Path, model: torch.nn.Module, source: str
) -> None:
    framework, suffix = source.split(".")
    tensors = model.state_dict() if framework == "torch" else parity.torch_to_flax(model)
    path = tmp_path / f"ckpt.{suffix}"
    parity.write_checkpoint(path, tensors, framework)
    x = torch.randn(2, 3, *ODD_SIZE)
    with torch.no_grad():
        expected = model(x).numpy()
        torch_model = parity.load_checkpoint(path, "torch")
        assert not torch_model.training
        np.testing.assert_array_equal(torch_model(x).numpy(), expected)
    flax_model, variables = parity.load_checkpoint(path, "linen")
    got = np.asarray(flax_model.apply(variables, jnp.asarray(x.permute(0, 2, 3, 1).numpy()), train=False))
    assert _rel(got, expected) < RTOL_FP32


def test_nested_state_dict_and_wrong_contents(tmp_path: Path, model: torch.nn.Module) -> None:
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, nested)
    assert parity.arch_of(parity.read_checkpoint(nested).tensors).name == "resnet18"
    junk = tmp_path / "junk.pth"
    torch.save({"epoch": 3}, junk)
    with pytest.raises(parity.CheckpointError, match="junk.pth.*expected a state dict"):
        parity.read_checkpoint(junk)
    other = tmp_path / "linear.safetensors"
    parity.write_checkpoint(other, {"weight": torch.randn(3, 2)}, "torch")
    with pytest.raises(parity.ConversionError, match="linear.safetensors"):
        parity.load_checkpoint(other, "linen")
    with pytest.raises(parity.CheckpointError, match="unknown checkpoint suffix"):
        parity.read_checkpoint(tmp_path / "w.ckpt")
    with pytest.raises(parity.CheckpointError, match="holds flax weights"):
        parity.write_checkpoint(tmp_path / "w.msgpack", model.state_dict(), "torch")


def test_flax_is_read_as_linen_wherever_a_framework_comes_in(
    tmp_path: Path, model: torch.nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    """Arguments, the command line and a file's metadata take "flax" for "linen"; files record "linen"."""
    variables = parity.torch_to_flax(model)
    path = tmp_path / "v.safetensors"
    parity.write_checkpoint(path, variables, "flax")
    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["framework"] == "linen"
    aliased = tmp_path / "aliased.safetensors"
    safetensors.torch.save_file(tensors, aliased, {**meta, "framework": "flax"})
    ckpt = parity.read_checkpoint(aliased)
    assert ckpt.framework == "linen" and _same_tree(ckpt.tensors, variables)
    assert _same_tree(parity.load_checkpoint(aliased, "flax")[1], variables)
    safetensors.torch.save_file(tensors, aliased, {**meta, "framework": "keras"})
    with pytest.raises(parity.CheckpointError, match=r"must be one of torch, linen \(flax for linen\), got 'keras'"):
        parity.read_checkpoint(aliased)
    with pytest.raises(ValueError, match="framework must be one of torch, linen, nnx, got 'keras'"):
        parity.write_checkpoint(path, variables, "keras")
    with pytest.raises(ValueError, match="framework must be one of torch, linen, nnx, got 'jax'"):
        parity.load_checkpoint(path, "jax")
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(tmp_path / "aliased.safetensors"), str(out), "--to", "flax"]) == 2  # keras, refused
    assert main(["convert", str(path), str(out), "--to", "flax"]) == 0
    assert "(linen) -> " in capsys.readouterr().out and parity.read_checkpoint(out).framework == "linen"
    with pytest.raises(SystemExit):
        main(["convert", str(path), str(out), "--to", "jax"])
    err = capsys.readouterr().err
    assert "invalid choice: 'jax'" in err and all(name in err for name in ("torch", "linen", "nnx"))
    shown = []
    for framework in ("linen", "flax"):
        assert main(["summary", "--arch", "resnet18", "--framework", framework, "--show", "parameters"]) == 0
        shown.append(capsys.readouterr().out)
    assert shown[0] == shown[1] and "conv1/0/kernel" in shown[0]


# --- refusals and corruption ----------------------------------------------------------------------


class _Payload:
    """Pickles to a call that creates a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_code_payload_is_refused_without_side_effect(tmp_path: Path, model: torch.nn.Module) -> None:
    proof = tmp_path / "payload_works"
    pickle.loads(pickle.dumps(_Payload(proof)))
    assert proof.exists()  # the payload is live: plain unpickling runs it

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({**model.state_dict(), "evil": _Payload(marker)}, path)
    for load in (parity.read_checkpoint, lambda p: parity.load_checkpoint(p, "linen")):
        with pytest.raises(parity.CheckpointError, match=r"evil\.pth: refused by torch.load\(weights_only=True\)"):
            load(path)
    assert not marker.exists()


def _small_files(tmp: Path) -> dict[str, bytes]:
    """Valid files of each format, small enough to fuzz quickly."""
    sd = {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4).to(torch.bfloat16), "n": torch.tensor(7)}
    tree = {"params": {"a": {"kernel": np.random.randn(3, 4).astype(np.float32)}}, "batch_stats": {"n": np.int32(7)}}
    out = {}
    for name, tensors, framework in [
        ("t.safetensors", sd, "torch"),
        ("f.safetensors", tree, "linen"),
        ("t.pth", sd, "torch"),
        ("f.msgpack", tree, "linen"),
    ]:
        parity.write_checkpoint(tmp / name, tensors, framework)
        out[name] = (tmp / name).read_bytes()
    return out


@pytest.fixture(scope="module")
def small_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    tmp = tmp_path_factory.mktemp("small")
    return tmp, _small_files(tmp)


@pytest.mark.parametrize("name", ["t.safetensors", "f.safetensors", "t.pth", "f.msgpack"])
@FUZZ
@given(fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_files_raise_the_projects_error(small_files, name: str, fraction: float) -> None:
    tmp, files = small_files
    data = files[name]
    path = tmp / f"cut_{name}"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(parity.CheckpointError, match=f"cut_{name}"):
        parity.read_checkpoint(path)


@pytest.mark.parametrize("name", ["t.safetensors", "f.safetensors", "t.pth", "f.msgpack"])
@FUZZ
@given(position=st.floats(0.0, 1.0, exclude_max=True), bit=st.integers(0, 7))
def test_bit_flips_give_the_projects_error_or_intact_tensors(small_files, name: str, position: float, bit: int) -> None:
    tmp, files = small_files
    data = bytearray(files[name])
    data[int(len(data) * position)] ^= 1 << bit
    path = tmp / f"flip_{name}"
    path.write_bytes(bytes(data))
    try:
        ckpt = parity.read_checkpoint(path)
    except parity.CheckpointError as e:
        assert f"flip_{name}" in str(e)
        return
    # Every format records a sha256, which lets no changed tensor through.
    original = parity.read_checkpoint(tmp / name)
    same = _same_tensors if original.framework == "torch" else _same_tree
    assert same(ckpt.tensors, original.tensors)


def _rewritten(name: str, data: bytes, tmp: Path, change: Callable[[Any, dict], None]) -> bytes:
    """The file after change(its first weight, its metadata holding our digest), re-saved by the format's own tools."""
    path = tmp / f"src_{name}"
    path.write_bytes(data)
    if name.endswith(".pth"):
        sd = torch.load(path, weights_only=True)
        change(sd["a.weight"], sd._metadata[DIGEST_ENTRY])
        torch.save(sd, path)
    elif name.endswith(".msgpack"):
        tree = jax.tree.map(np.array, flax.serialization.msgpack_restore(data))  # writable copies
        change(tree["params"]["a"]["kernel"], tree[DIGEST_ENTRY])
        path.write_bytes(flax.serialization.msgpack_serialize(tree))
    else:
        with safe_open(path, framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        change(tensors["a.weight" if "a.weight" in tensors else "params/a/kernel"], meta)
        safetensors.torch.save_file(tensors, path, meta)
    return path.read_bytes()


def _add_one(weight: Any, entry: dict) -> None:
    weight[0, 0] += 1


def _drop_digest(weight: Any, entry: dict) -> None:
    del entry["sha256"]


def _garble_digest(weight: Any, entry: dict) -> None:
    entry["sha256"] = "not a digest"


@pytest.mark.parametrize("name", ["t.safetensors", "f.safetensors", "t.pth", "f.msgpack"])
def test_a_changed_weight_is_refused_in_every_format(small_files, name: str) -> None:
    tmp, files = small_files
    path = tmp / f"edit_{name}"
    path.write_bytes(_rewritten(name, files[name], tmp, _add_one))
    with pytest.raises(parity.CheckpointError, match=f"edit_{name}: corrupted: the tensors do not match the sha256"):
        parity.read_checkpoint(path)


@pytest.mark.parametrize("damage", [_drop_digest, _garble_digest])
@pytest.mark.parametrize("name", ["t.safetensors", "f.safetensors", "t.pth", "f.msgpack"])
def test_our_file_with_a_missing_or_malformed_digest_is_corrupted(small_files, name: str, damage) -> None:
    tmp, files = small_files
    path = tmp / f"nodigest_{name}"
    path.write_bytes(_rewritten(name, files[name], tmp, damage))
    with pytest.raises(parity.CheckpointError, match=f"nodigest_{name}: corrupted: its sha256 digest is missing or"):
        parity.read_checkpoint(path)


def test_foreign_files_load_with_a_one_line_notice(
    tmp_path: Path, model: torch.nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    sd = model.state_dict()
    torch.save(sd, tmp_path / "other.pth")
    safetensors.torch.save_file(dict(sd), tmp_path / "other.safetensors", {"format": "pt"})
    (tmp_path / "other.msgpack").write_bytes(flax.serialization.msgpack_serialize(parity.torch_to_flax(model)))
    for name in ("other.pth", "other.safetensors", "other.msgpack"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="parity.conversion.files"):
            ckpt = parity.read_checkpoint(tmp_path / name)
        [notice] = caplog.messages
        assert name in notice and "cannot be verified" in notice and "\n" not in notice
        assert len(traverse_util.flatten_dict(ckpt.tensors) if ckpt.framework == "linen" else ckpt.tensors) == len(sd)
    caplog.clear()
    parity.write_checkpoint(tmp_path / "ours.pth", sd, "torch")
    parity.read_checkpoint(tmp_path / "ours.pth")
    assert not caplog.messages


def test_our_pth_and_msgpack_load_with_other_tools(tmp_path: Path, model: torch.nn.Module) -> None:
    """The digest rides in the state dict's _metadata and in one extra msgpack entry: others load them as usual."""
    parity.write_checkpoint(tmp_path / "w.pth", model.state_dict(), "torch")
    sd = torch.load(tmp_path / "w.pth", weights_only=True)
    assert list(sd) == list(model.state_dict())
    fresh = resnet_torch.resnet18(num_classes=5)
    fresh.load_state_dict(sd, strict=True)
    assert _same_tensors(fresh.state_dict(), model.state_dict())

    variables = parity.torch_to_flax(model)
    parity.write_checkpoint(tmp_path / "v.msgpack", variables, "linen")
    zeros = jax.tree.map(np.zeros_like, variables)
    restored = flax.serialization.from_bytes(zeros, (tmp_path / "v.msgpack").read_bytes())
    assert _same_tree(restored, variables)


def test_truncated_real_checkpoint_names_the_file(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "r18.safetensors"
    parity.write_checkpoint(path, model.state_dict(), "torch")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for framework in ("torch", "linen"):
        with pytest.raises(parity.CheckpointError, match="r18.safetensors"):
            parity.load_checkpoint(path, framework)


# --- atomic writes --------------------------------------------------------------------------------


def test_failed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"

    def half_then_fail(f) -> None:
        f.write(b"x" * 1000)
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        atomic_write(path, half_then_fail)
    assert os.listdir(tmp_path) == []
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        atomic_write(path, half_then_fail)
    assert os.listdir(tmp_path) == ["out.bin"] and path.read_bytes() == b"old"


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_failed_checkpoint_write_keeps_the_old_file(
    tmp_path: Path, model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    path = tmp_path / f"w{suffix}"
    path.write_bytes(b"previous")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(parity.CheckpointError, match=f"w{suffix}: cannot write"):
        parity.write_checkpoint(path, model.state_dict(), "torch")
    assert os.listdir(tmp_path) == [path.name] and path.read_bytes() == b"previous"


@pytest.fixture
def default_umask():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_new_files_get_the_usual_mode_and_replaced_files_keep_theirs(tmp_path: Path, default_umask) -> None:
    path = tmp_path / "report.json"
    atomic_write(path, lambda f: f.write(b"{}"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    path.chmod(0o600)
    atomic_write(path, lambda f: f.write(b"[]"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b"[]"


def test_a_symlink_stays_and_its_target_is_replaced_beside_itself(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "w.json"
    target.write_bytes(b"old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    atomic_write(link, lambda f: f.write(b"new"))
    assert link.is_symlink() and target.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["link.json", "real"] and os.listdir(tmp_path / "real") == ["w.json"]


def test_a_fifo_is_written_through_not_replaced(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader before the write, with no thread to race
    try:
        assert atomic_write(fifo, lambda f: f.write(b"through")) == 7
        assert os.read(reader, 100) == b"through"
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(fifo.stat().st_mode) and os.listdir(tmp_path) == ["pipe"]


def test_devices_are_written_through_and_a_full_one_says_so(tmp_path: Path) -> None:
    null, full = tmp_path / "null", tmp_path / "full"
    null.symlink_to("/dev/null")
    full.symlink_to("/dev/full")
    assert atomic_write(null, lambda f: f.write(b"gone")) == 4
    with pytest.raises(OSError, match="No space left on device") as e:
        atomic_write(full, lambda f: f.write(b"x"))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(full)
    for device in ("/dev/null", "/dev/full"):
        assert stat.S_ISCHR(os.stat(device).st_mode)
    with pytest.raises(ValueError, match="not a regular file"):
        atomic_write(null, lambda f: f.write(b"x"), check=lambda tmp: None)


def test_dev_stdout_writes_to_our_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    """Under pytest, fd 1 is a regular temp file: it must be written through, not replaced by a new file."""
    print("before", flush=True)
    atomic_write("/dev/stdout", lambda f: f.write(b"through stdout\n"))
    print("after", flush=True)
    assert capfd.readouterr().out == "before\nthrough stdout\nafter\n"


def test_a_failed_check_keeps_the_file_from_its_path(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "w.safetensors"
    seen = []

    def refuse(written: Path) -> None:
        seen.append(parity.read_checkpoint(written).framework)
        raise RuntimeError("does not match")

    with pytest.raises(RuntimeError, match="does not match"):
        parity.write_checkpoint(path, model.state_dict(), "torch", check=refuse)
    assert seen == ["torch"] and os.listdir(tmp_path) == []


def test_a_full_disk_under_a_pth_output_is_a_sentence(
    tmp_path: Path, model: torch.nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "w.safetensors"
    parity.write_checkpoint(src, model.state_dict(), "torch")
    out = tmp_path / "out.pth"
    out.symlink_to("/dev/full")  # a real ENOSPC from the kernel, no mount needed
    assert main(["convert", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert "out.pth: cannot write" in err and "No space left on device" in err and "Traceback" not in err


# --- the CLI ---------------------------------------------------------------------------------------


def test_cli_converts_both_directions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tv = torchvision.models.resnet18(weights=None)
    src = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), src)

    flax_file = tmp_path / "flax.safetensors"
    assert main(["convert", str(src), str(flax_file)]) == 0
    out = capsys.readouterr().out
    assert "(torch) -> " in out and "(linen)" in out and "resnet18" in out and "1000 classes" in out
    assert "122 tensors" in out and "bytes" in out
    variables = parity.read_checkpoint(flax_file).tensors
    assert _same_tree(variables, parity.torch_to_flax(tv))

    back = tmp_path / "back.safetensors"
    assert main(["convert", str(flax_file), str(back), "--layout", "torchvision"]) == 0
    assert "(torch, torchvision names)" in capsys.readouterr().out
    sd = parity.read_checkpoint(back).tensors
    assert _same_tensors(sd, tv.state_dict())
    torchvision.models.resnet18(weights=None).load_state_dict(sd, strict=True)

    msgpack = tmp_path / "half.msgpack"
    assert main(["convert", str(back), str(msgpack), "--param-dtype", "bf16"]) == 0
    capsys.readouterr()
    assert parity.read_checkpoint(msgpack).tensors["params"]["fc"]["kernel"].dtype == jnp.bfloat16


def test_cli_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a zip file at all")
    assert main(["convert", str(bad), str(tmp_path / "out.safetensors")]) == 2
    assert "bad.pth" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_stale_temporaries_are_the_names_atomic_write_uses(tmp_path, monkeypatch) -> None:
    from parity.conversion import atomic

    seen = []
    real = atomic._replace

    def spy(target, write, check):
        seen.append(atomic._temporary(target).name)
        return real(target, write, check)

    monkeypatch.setattr(atomic, "_replace", spy)
    atomic_write(tmp_path / "model.safetensors", lambda f: f.write(b"x"))
    (tmp_path / seen[0]).write_bytes(b"left by a kill")
    (tmp_path / ".x.tmp.json").write_text("not ours")
    assert [p.name for p in atomic.stale_temporaries(tmp_path)] == [seen[0]]
