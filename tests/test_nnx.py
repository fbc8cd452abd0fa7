"""resnet_flax.nnx: the linen mirror's tree and numbers in Flax NNX, converted, folded, fused, shown and checked."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx, traverse_util

import parity
import resnet_flax
import resnet_torch
from parity.checks.pairs import randomize_batchnorm
from parity.checks.precision import CHECKS, CPU, FP32, FP64
from parity.checks.run import run_checks
from parity.cli import main
from resnet_arch import STAGE_OUTPUTS
from resnet_flax import layers as linen_layers
from resnet_flax import nnx as flax_nnx
from resnet_flax import nnx_layers
from resnet_flax.fold import fold as linen_fold
from resnet_flax.model import init_key

ODD_SIZE = (33, 47)  # odd, non-square: symmetric padding and 'SAME' differ here


def _flat(tree: Any) -> dict[str, Any]:
    return traverse_util.flatten_dict(dict(tree), sep="/")


def _same_arrays(a: Any, b: Any) -> bool:
    """Equal trees: the same paths, dtypes and bits."""
    fa, fb = _flat(a), _flat(b)
    return fa.keys() == fb.keys() and all(
        np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype and np.array_equal(fa[k], fb[k]) for k in fa
    )


def _rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _torch_model(arch: str = "resnet18", dtype: torch.dtype = torch.float32, **options: Any) -> torch.nn.Module:
    """A resnet_torch model with random BatchNorm parameters, statistics and counters."""
    model = resnet_torch.build(arch, **options)
    randomize_batchnorm(model, torch.Generator().manual_seed(5))
    return model.to(dtype).eval()


def _nhwc(x_nchw: torch.Tensor) -> jax.Array:
    return jnp.asarray(x_nchw.permute(0, 2, 3, 1).numpy())


def _jitted(model: nnx.Module, x: jax.Array) -> Any:
    """The model's call under jax.jit over its split state, as the checks and the trainer run it."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


# --- the model ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, small_stem", [("resnet18", True), ("resnet50", False)])
def test_state_paths_are_the_linen_variables_paths(arch: str, small_stem: bool) -> None:
    options = dict(num_classes=7, small_stem=small_stem)
    model = nnx.eval_shape(lambda: flax_nnx.build(arch, **options, rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    linen = jax.eval_shape(lambda x: resnet_flax.build(arch, **options).init(jax.random.key(0), x), x)
    everything = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model))}
    for kind, collection in ((nnx.Param, "params"), (nnx.BatchStat, "batch_stats")):
        state = {path: v.get_value() for path, v in everything.items() if isinstance(v, kind)}
        want = _flat(linen[collection])
        assert state.keys() == want.keys(), collection
        assert all((state[k].shape, state[k].dtype) == (want[k].shape, want[k].dtype) for k in want), collection
    assert len(everything) == len(_flat(linen["params"])) + len(_flat(linen["batch_stats"]))
    assert isinstance(everything["conv2_x/0/residual_function/0/kernel"], nnx.Param)
    assert isinstance(everything["conv2_x/0/residual_function/1/num_batches_tracked"], nnx.BatchStat)


def test_eval_logits_are_bit_identical_to_linen_fp32() -> None:
    torch_model = _torch_model(num_classes=10)
    variables = parity.torch_to_flax(torch_model)
    model = parity.torch_to_nnx(torch_model)
    x = _nhwc(torch.randn(2, 3, *ODD_SIZE))
    linen = jax.jit(lambda v, x: resnet_flax.resnet18().apply(v, x, train=False))(variables, x)
    got = _jitted(model, x)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(linen))
    with torch.no_grad():
        assert _rel(got, torch_model(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()))) < 1e-5


def test_train_mode_updates_statistics_in_place_as_linen_does() -> None:
    """Same logits and new statistics as linen's train-mode call, bit for bit; the counter gains 1."""
    torch_model = _torch_model(num_classes=10)
    variables = parity.torch_to_flax(torch_model)
    model = parity.torch_to_nnx(torch_model)
    model.train()
    x = _nhwc(torch.randn(2, 3, *ODD_SIZE))
    linen = resnet_flax.resnet18()
    want, updated = jax.jit(lambda v, x: linen.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)

    graphdef, state = nnx.split(model)

    def call(state: Any, x: jax.Array) -> tuple[jax.Array, Any]:
        m = nnx.merge(graphdef, state)
        return m(x), nnx.state(m)

    got, new_state = jax.jit(call)(state, x)
    nnx.update(model, new_state)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    stats = parity.nnx_to_linen(model)["batch_stats"]
    assert _same_arrays(stats, updated["batch_stats"])
    before = torch_model.conv3_x[0].shortcut[1].num_batches_tracked.item()
    assert int(model.conv3_x[0].shortcut[1].num_batches_tracked[...]) == before + 1


def test_train_eval_and_view_switch_batchnorm() -> None:
    model = parity.torch_to_nnx(_torch_model(num_classes=3, small_stem=True))
    norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, flax_nnx.BatchNorm2d)]
    assert norms and all(m.use_running_average for m in norms)  # the converter returns eval mode
    x = _nhwc(torch.randn(2, 3, 9, 11))
    eval_logits = _jitted(model, x)
    model.train()
    assert not any(m.use_running_average for m in norms)
    view = nnx.view(model, use_running_average=True)
    np.testing.assert_array_equal(np.asarray(_jitted(view, x)), np.asarray(eval_logits))
    assert view.fc.kernel is model.fc.kernel  # a view shares the model's variables
    before = np.asarray(model.conv1[1].mean[...])
    model(x)  # train mode: statistics change in place
    assert not np.array_equal(np.asarray(model.conv1[1].mean[...]), before)


def test_fused_view_trains_the_same_function() -> None:
    """resnet_flax.nnx.fused shares the variables and computes the plain model's train step (fp64)."""
    with jax.enable_x64(True):
        torch_model = resnet_torch.ResNet(resnet_torch.BasicBlock, [1, 1, 1, 1], num_classes=4, small_stem=True)
        randomize_batchnorm(torch_model, torch.Generator().manual_seed(5))
        plain = parity.linen_to_nnx(parity.torch_to_flax(torch_model.double()), dtype=jnp.float64)
        fused = flax_nnx.fused(plain)
        assert flax_nnx.is_fused(fused) and not flax_nnx.is_fused(plain)
        assert fused.conv1[0].kernel is plain.conv1[0].kernel
        x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 9, 11, 3)))

        @nnx.jit
        def grads(model: flax_nnx.ResNet) -> Any:
            model.train()
            return nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(model)

        results = {}
        for name, model in (("plain", plain), ("fused", fused)):
            model = nnx.clone(model)
            results[name] = jax.tree.leaves(nnx.to_pure_dict(grads(model))), parity.nnx_to_linen(model)["batch_stats"]
    (g_plain, s_plain), (g_fused, s_fused) = results["plain"], results["fused"]
    assert _rel(np.concatenate([np.ravel(g) for g in g_fused]), np.concatenate([np.ravel(g) for g in g_plain])) < 1e-10
    assert all(_rel(a, b) < 1e-12 for a, b in zip(jax.tree.leaves(s_fused), jax.tree.leaves(s_plain), strict=True))


def test_fold_gives_linens_folded_weights_and_eval_logits() -> None:
    """One BottleNeck per stage (every stage still projects), in float64."""
    with jax.enable_x64(True):
        torch_model = resnet_torch.ResNet(resnet_torch.BottleNeck, [1, 1, 1, 1], num_classes=6)
        randomize_batchnorm(torch_model, torch.Generator().manual_seed(5))
        variables = parity.torch_to_flax(torch_model.double())
        model = parity.linen_to_nnx(variables, dtype=jnp.float64)
        folded = flax_nnx.fold(model)
        assert flax_nnx.is_folded(folded) and not flax_nnx.is_folded(model)
        assert model.conv1[1].use_running_average and model.conv1[0].bias is None  # unchanged
        linen = resnet_flax.ResNet(resnet_flax.BottleNeck, (1, 1, 1, 1), num_classes=6)
        assert _same_arrays(nnx.to_pure_dict(nnx.state(folded, nnx.Param)), linen_fold(linen, variables)[1]["params"])
        assert not nnx.state(folded, nnx.BatchStat)
        x = _nhwc(torch.randn(2, 3, *ODD_SIZE, dtype=torch.float64))
        assert _rel(_jitted(folded, x), _jitted(model, x)) < 1e-10
        folded.train()
        with pytest.raises(ValueError, match="inference-only"):
            folded(x)
    with pytest.raises(TypeError, match="not folded"):
        flax_nnx.fold(folded)
    with pytest.raises(TypeError, match="not folded"):
        flax_nnx.fused(folded)


def test_fold_takes_each_batchnorms_epsilon() -> None:
    """BatchNorms whose epsilon is not torch's default fold with their own (as linen's fold reads the model's)."""
    with jax.enable_x64(True):
        torch_model = resnet_torch.ResNet(resnet_torch.BasicBlock, [1, 1, 1, 1], num_classes=4, small_stem=True)
        randomize_batchnorm(torch_model, torch.Generator().manual_seed(5))
        model = parity.linen_to_nnx(parity.torch_to_flax(torch_model.double()), dtype=jnp.float64)
        norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, flax_nnx.BatchNorm2d)]
        for m in norms:
            m.epsilon = 0.5
        x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 9, 11, 3)))
        assert _rel(_jitted(flax_nnx.fold(model), x), _jitted(model, x)) < 1e-10


def test_options_and_init_follow_the_linen_builders() -> None:
    block, stages = flax_nnx.BasicBlock, (1, 1, 1, 1)  # one block per stage: every stage still projects
    rngs = nnx.Rngs(init_key(0))  # "rbg" bits, as training draws them: much faster to compile on CPU
    model = flax_nnx.ResNet(block, stages, num_classes=5, zero_init_residual=True, dtype=jnp.bfloat16, rngs=rngs)
    assert model.conv2_x[0].residual_function[4].scale[...].sum() == 0
    assert model.conv2_x[0].residual_function[1].scale[...].min() == 1
    assert model.conv1[1].mean.get_value().dtype == jnp.float32  # bf16 compute, float32 statistics
    assert float(jnp.abs(model.fc.bias[...]).max()) == 0 and abs(float(model.fc.kernel[...].std()) / 0.01 - 1) < 0.05
    assert model.conv1[0].kernel[...].shape == (7, 7, 3, 64) and model.conv1.num_layers == 4
    assert _jitted(model, jnp.zeros((1, 16, 16, 3))).dtype == jnp.bfloat16
    default = flax_nnx.ResNet(block, stages, num_classes=5, init_weights=False, small_stem=True, rngs=rngs)
    bound = 1 / np.sqrt(512)  # torch's default Linear init: U(+-1/sqrt(fan_in))
    assert 0 < float(jnp.abs(default.fc.bias[...]).max()) <= bound
    assert default.conv1[0].kernel[...].shape == (3, 3, 3, 64) and default.conv1.num_layers == 3


def _layer_options(init: Any) -> dict[str, tuple[Any, Any]]:
    """A layer constructor's arguments: name -> (kind, default), without self, rngs and linen's parent/name."""
    params = inspect.signature(init).parameters.values()
    return {p.name: (p.kind, p.default) for p in params if p.name not in ("self", "rngs", "parent", "name")}


@pytest.mark.parametrize("layer", ["Conv2d", "BatchNorm2d", "Linear"])
def test_layers_take_linens_arguments_and_defaults(layer: str) -> None:
    """The same names, order, keyword-only options and defaults (use_bias, use_running_average=False, ...)."""
    linen, own = getattr(linen_layers, layer), getattr(nnx_layers, layer)
    assert list(_layer_options(linen).items()) == list(_layer_options(own.__init__).items())


@pytest.mark.parametrize(
    "shape, match",
    [((2, 3, 16, 16), r"looks like NCHW"), ((2, 16, 16, 1), r"3 channels last"), ((16, 16, 3), r"rank 4")],
)
def test_rejects_bad_input_and_options(shape: tuple[int, ...], match: str) -> None:
    model = nnx.eval_shape(lambda: flax_nnx.resnet18(num_classes=3, small_stem=True, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=match):
        nnx.eval_shape(lambda: model(jnp.zeros(shape)))
    with pytest.raises(ValueError, match="num_block must be 4 positive ints"):
        flax_nnx.ResNet(flax_nnx.BottleNeck, [3, 4, 6], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="block must be one of BasicBlock, BottleNeck"):
        flax_nnx.ResNet(resnet_flax.BottleNeck, [3, 4, 6, 3], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown arch 'resnet51'"):
        flax_nnx.build("resnet51", rngs=nnx.Rngs(0))


# --- the converter -----------------------------------------------------------------------------------


def test_torch_to_nnx_builds_abstractly(monkeypatch: pytest.MonkeyPatch) -> None:
    """No initial weight is drawn: every initializer call sees an abstract key (nnx.eval_shape)."""
    keys = []
    real = flax_nnx.kaiming_normal_fan_out

    def recording(key: jax.Array, *args: Any) -> jax.Array:
        keys.append(key)
        return real(key, *args)

    monkeypatch.setattr(flax_nnx, "kaiming_normal_fan_out", recording)
    model = parity.torch_to_nnx(_torch_model("resnet34", num_classes=3))
    assert len(keys) == 36 and all(isinstance(k, jax.core.Tracer) for k in keys)
    assert isinstance(model.conv1[0].kernel[...], jax.Array)


@pytest.mark.parametrize("layout", ["seed", "torchvision"])
def test_round_trips_are_lossless(layout: str) -> None:
    torch_model = _torch_model(num_classes=10)
    sd = parity.flax_to_torch(parity.torch_to_flax(torch_model), layout=layout)
    model = parity.torch_to_nnx(sd)
    back = parity.nnx_to_torch(model, layout=layout)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd)
    variables = parity.nnx_to_linen(model)
    assert _same_arrays(variables, parity.torch_to_flax(torch_model))
    assert variables["batch_stats"]["conv1"]["1"]["num_batches_tracked"].dtype == jnp.int32
    again = parity.linen_to_nnx(variables)
    assert _same_arrays(parity.nnx_to_linen(again), variables)
    with jax.enable_x64(True):
        wide = parity.torch_to_nnx(_torch_model(num_classes=10, dtype=torch.float64))
        assert wide.fc.kernel.get_value().dtype == jnp.float64 and wide.param_dtype == jnp.float64
        assert _same_arrays(
            parity.nnx_to_linen(parity.linen_to_nnx(parity.nnx_to_linen(wide))), parity.nnx_to_linen(wide)
        )


def test_mismatches_name_every_key() -> None:
    sd = _torch_model(num_classes=10).state_dict()
    target = nnx.eval_shape(lambda: flax_nnx.resnet34(num_classes=10, rngs=nnx.Rngs(0)))
    with pytest.raises(parity.ConversionError) as e:
        parity.torch_to_nnx(sd, target=target)
    assert "missing (" in str(e.value) and "conv2_x.2.residual_function.0.weight" in str(e.value)
    variables = parity.torch_to_flax(sd)
    del variables["batch_stats"]["conv1"]["1"]["var"]
    fc = variables["params"]["fc"]
    fc["kernel"] = fc["kernel"][:-1]
    with pytest.raises(parity.ConversionError) as e:
        parity.linen_to_nnx(variables)
    assert "missing (1): batch_stats/conv1/1/var" in str(e.value)
    assert "params/fc/kernel: got (511, 10), expected (512, 10)" in str(e.value)
    folded = flax_nnx.fold(parity.torch_to_nnx(sd))
    with pytest.raises(parity.ConversionError, match=r"unexpected \(20\).*params/conv1/0/bias"):
        parity.nnx_to_torch(folded)


def test_dtype_is_the_computation_dtype_and_param_dtype_the_weights(tmp_path: Path) -> None:
    """As in Flax, for every converter that builds an NNX model and for load_checkpoint."""
    torch_model = _torch_model(num_classes=10)
    computing = parity.torch_to_nnx(torch_model, dtype=jnp.bfloat16)
    assert computing.fc.kernel.get_value().dtype == jnp.float32 and computing.param_dtype == jnp.float32
    assert _jitted(computing, jnp.zeros((1, 9, 11, 3))).dtype == jnp.bfloat16
    variables = parity.torch_to_flax(torch_model)
    path = tmp_path / "w.safetensors"
    parity.write_checkpoint(path, variables, "linen")
    for half in (
        parity.torch_to_nnx(torch_model, param_dtype=jnp.bfloat16),
        parity.linen_to_nnx(variables, param_dtype=jnp.bfloat16),
        parity.load_checkpoint(path, "nnx", param_dtype=jnp.bfloat16),
    ):
        assert half.fc.kernel.get_value().dtype == jnp.bfloat16 and half.param_dtype == jnp.bfloat16
        assert half.conv1[1].num_batches_tracked.get_value().dtype == jnp.int32
        assert half.dtype == jnp.float32  # the builder's default computation dtype: param_dtype leaves it
    linen_model, half_variables = parity.load_checkpoint(path, "linen", param_dtype=jnp.bfloat16, dtype=jnp.float32)
    assert half_variables["params"]["fc"]["kernel"].dtype == jnp.bfloat16
    assert (linen_model.param_dtype, linen_model.dtype) == (jnp.bfloat16, jnp.float32)
    assert parity.nnx_to_torch(computing, param_dtype=torch.bfloat16)["fc.weight"].dtype == torch.bfloat16
    target = nnx.eval_shape(lambda: flax_nnx.resnet18(num_classes=10, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"builder options \(dtype\) are for a new model"):
        parity.torch_to_nnx(torch_model, target=target, dtype=jnp.bfloat16)


def test_nan_weights_are_refused_or_warned_alike_by_both_apis(tmp_path: Path) -> None:
    """torch_to_nnx/nnx_to_torch/nnx_to_linen as torch_to_flax/flax_to_torch; write_checkpoint writes both alike."""
    sd = _torch_model(num_classes=10).state_dict()
    sd["fc.weight"][0, 0] = float("nan")

    def outcomes(convert: Any, arg: Any) -> tuple[str, str, Any]:
        """(the error, the warning) a conversion gives with bad_values 'error' and 'warn', and its result."""
        with pytest.raises(parity.ConversionError) as e:
            convert(arg)
        with pytest.warns(UserWarning) as record:
            result = convert(arg, bad_values="warn")
        [warning] = record
        assert warning.filename == __file__  # the warning points at the caller's line
        return str(e.value), str(warning.message), result

    linen_error, linen_warning, variables = outcomes(parity.torch_to_flax, sd)
    nnx_error, nnx_warning, model = outcomes(parity.torch_to_nnx, sd)
    assert (nnx_error, nnx_warning) == (linen_error, linen_warning)
    assert "NaN/inf (1): fc.weight (1 NaN, 0 inf)" in linen_error and "NaN/inf: fc.weight" in linen_warning
    nnx_error, nnx_warning, back = outcomes(parity.nnx_to_linen, model)
    assert (nnx_error, nnx_warning) == (
        linen_error.replace("fc.weight", "params/fc/kernel"),
        linen_warning.replace("fc.weight", "params/fc/kernel"),
    )
    same, want = _flat(back), _flat(variables)
    assert same.keys() == want.keys()
    for k in want:  # NaN equals NaN here
        np.testing.assert_array_equal(np.asarray(same[k]), np.asarray(want[k]), strict=True)

    linen_error, linen_warning, linen_sd = outcomes(parity.flax_to_torch, variables)
    nnx_error, nnx_warning, nnx_sd = outcomes(parity.nnx_to_torch, model)
    assert (nnx_error, nnx_warning) == (linen_error, linen_warning)
    assert "NaN/inf (1): params/fc/kernel (1 NaN, 0 inf)" in linen_error
    assert list(nnx_sd) == list(linen_sd) and all(
        np.array_equal(nnx_sd[k].numpy(), linen_sd[k].numpy(), equal_nan=True) for k in linen_sd
    )

    # write_checkpoint writes the weights as given, for either API alike: the same file.
    paths = {api: tmp_path / f"{api}.safetensors" for api in ("linen", "nnx")}
    parity.write_checkpoint(paths["linen"], variables, "linen")
    parity.write_checkpoint(paths["nnx"], model, "nnx")
    assert paths["linen"].read_bytes() == paths["nnx"].read_bytes()
    for api in ("linen", "nnx"):
        with pytest.raises(parity.ConversionError, match=r"NaN/inf \(1\): params/fc/kernel"):
            parity.load_checkpoint(paths["nnx"], api)
        with pytest.warns(UserWarning, match="converting values no trained network has: NaN/inf: params/fc/kernel"):
            parity.load_checkpoint(paths["linen"], api, bad_values="warn")


# --- checkpoint files and the CLI ---------------------------------------------------------------------


@pytest.mark.parametrize("source", ["torch.pth", "nnx.safetensors", "nnx.msgpack"])
def test_checkpoint_files_load_as_nnx(tmp_path: Path, source: str) -> None:
    framework, suffix = source.split(".")
    torch_model = _torch_model(num_classes=10)
    tensors = torch_model.state_dict() if framework == "torch" else parity.torch_to_nnx(torch_model)
    path = tmp_path / f"ckpt.{suffix}"
    parity.write_checkpoint(path, tensors, framework)
    model = parity.load_checkpoint(path, "nnx")
    assert isinstance(model, flax_nnx.ResNet) and model.conv1[1].use_running_average
    assert _same_arrays(parity.nnx_to_linen(model), parity.torch_to_flax(torch_model))
    if framework == "nnx":  # an NNX model's file is a Flax file: linen reads it too
        assert parity.read_checkpoint(path).framework == "linen"
        _, variables = parity.load_checkpoint(path, "linen")
        assert _same_arrays(variables, parity.torch_to_flax(torch_model))


def test_cli_converts_to_nnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch_model = _torch_model(num_classes=10)
    src = tmp_path / "model.pth"
    torch.save(torch_model.state_dict(), src)
    out = tmp_path / "model.safetensors"
    assert main(["convert", str(src), str(out), "--to", "nnx"]) == 0
    assert "(torch) -> " in capsys.readouterr().out
    model = parity.load_checkpoint(out, "nnx")
    assert _same_arrays(parity.nnx_to_linen(model), parity.torch_to_flax(torch_model))
    half = tmp_path / "half.msgpack"
    assert main(["convert", str(out), str(half), "--to", "nnx", "--param-dtype", "bf16"]) == 0
    assert "(nnx)" in capsys.readouterr().out
    assert parity.load_checkpoint(half, "nnx").fc.kernel.get_value().dtype == jnp.bfloat16


def test_summary_shows_the_nnx_model(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["summary", "--arch", "resnet50", "--framework", "nnx", "--num-classes", "1000"]
    assert main([*argv, "--input-size", "97", "131"]) == 0
    table = capsys.readouterr().out
    assert all(f"│ {name} " in table for name in STAGE_OUTPUTS)
    assert "float32[1,4,5,2048]" in table and "Total params: 25,557,032" in table
    assert main(["summary", "--arch", "resnet18", "--framework", "nnx", "--small-stem", "--show", "modules"]) == 0
    modules = capsys.readouterr().out
    assert "conv5_x/1/residual_function/4 " in modules and "MaxPool2d" not in modules
    assert main(["summary", "--arch", "resnet18", "--framework", "nnx", "--show", "parameters"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    params = list(resnet_torch.resnet18().parameters())
    assert lines[-1] == f"Total params: {sum(p.numel() for p in params):,} in {len(params)} tensors"
    assert lines[0].split()[0] == "conv1/0/kernel"


# --- parity --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision, fused_bn", [(FP64, False), (FP32, True)])
def test_nnx_parity_with_torch(precision: str, fused_bn: bool) -> None:
    """Every check at the linen model's tolerances (fp64: 3 SGD steps with nnx.Optimizer to 1e-10)."""
    results = run_checks("resnet18", CPU, precision, ODD_SIZE, 2, seed=1, fused_bn=fused_bn, api="nnx")
    assert [r.check for r in results] == list(CHECKS)
    for r in results:
        assert r.passed, f"{r.precision} {r.check}: rel {r.rel:.3e} > {r.limit:.0e}, at {r.first_diverging}"
        assert set(r.stage_errors) == set(STAGE_OUTPUTS)


def test_check_cli_runs_the_nnx_model(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["check", "--arch", "resnet18", "--size", "33", "47", "--precision", "fp32", "--checks", "eval logits"]
    assert main([*argv, "--api", "nnx"]) == 0
    assert "resnet_flax.nnx.ResNet" in capsys.readouterr().out
