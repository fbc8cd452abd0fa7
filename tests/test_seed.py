"""resnet_torch against facts recorded from the seed tutorial's own code (tests/fixtures/seed_resnet.json).

The fixture holds, for each network the tutorial's ResNet class builds, its state-dict keys in
order with their shapes and dtypes; the statistics of its initialisation; and the outputs of its
ResNet-50 in float64 for weights and an input drawn by ``recipe_state_dict`` / ``recipe_input``
below. How the fixture was made is written in the fixture itself.
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import resnet_torch
from resnet_arch import HEAD

FIXTURE_PATH = Path(__file__).parent / "fixtures" / "seed_resnet.json"
# Each sampled statistic may differ from the seed's by this many standard errors of the difference.
SIGMAS = 6
# The normal's mass beyond 3 standard deviations, the tail a truncated init would lack.
TAIL_STDS = 3
# float64 on both sides: what is left is summation order, far below this.
FP64_TOL = 1e-10

Entries = list[tuple[str, list[int], str]]


@functools.cache
def fixture() -> dict[str, Any]:
    return json.loads(FIXTURE_PATH.read_text())


def entries(arch: str) -> Entries:
    """The seed's (key, shape, dtype) list for one network, in registration order."""
    return [(key, shape, dtype) for key, shape, dtype in fixture()["networks"][arch]["state_dict"]]


def shapes_of(sd: Mapping[str, torch.Tensor]) -> Entries:
    return [(key, list(t.shape), str(t.dtype).removeprefix("torch.")) for key, t in sd.items()]


def meta_model(arch: str) -> torch.nn.Module:
    """resnet_torch's network with the fixture's options, on the meta device (shapes only)."""
    with torch.device("meta"):
        return resnet_torch.build(arch, num_classes=fixture()["networks"][arch]["num_classes"])


def recipe_state_dict(items: Entries, seed: int) -> OrderedDict[str, torch.Tensor]:
    """float64 weights drawn in state-dict order from numpy's default_rng(seed), by leaf kind:
    convolutions normal * sqrt(2 / fan_out), the classifier's weight normal * 0.05, BatchNorm
    weight and running_var uniform(0.5, 1.5), every other float 0.2 * normal, counters 0..99."""
    rng = np.random.default_rng(seed)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, shape, dtype in items:
        leaf = key.rsplit(".", 1)[-1]
        if dtype == "int64":
            value = np.asarray(rng.integers(0, 100), np.int64)
        elif len(shape) == 4:
            value = rng.standard_normal(shape) * np.sqrt(2.0 / (shape[0] * shape[2] * shape[3]))
        elif len(shape) == 2:
            value = rng.standard_normal(shape) * 0.05
        elif leaf in ("weight", "running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = 0.2 * rng.standard_normal(shape)
        sd[key] = torch.from_numpy(np.asarray(value))
    return sd


def recipe_input(seed: int, shape: list[int]) -> torch.Tensor:
    """An NCHW float64 batch from numpy's default_rng(seed): 2 * normal + 0.5."""
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape) * 2 + 0.5)


def init_statistics(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What the seed's initialisation promises, measured: per convolution its std and mean over
    sqrt(2 / fan_out), the pooled share of conv weights beyond 3 of those, the classifier weight's
    std and mean, and the distinct values of every other leaf kind."""
    convs = {k: v.double() for k, v in sd.items() if v.ndim == 4}
    targets = {k: np.sqrt(2.0 / (v.shape[0] * v.shape[2] * v.shape[3])) for k, v in convs.items()}
    fc = sd[f"{HEAD}.weight"].double()
    values: dict[str, set[float]] = {}
    for key, value in sd.items():
        if value.ndim < 2:
            module, leaf = key.rsplit(".", 1)
            kind = f"{HEAD}.{leaf}" if module == HEAD else f"BatchNorm2d.{leaf}"
            values.setdefault(kind, set()).update(value.double().flatten().tolist())
    beyond = sum(int((v.abs() > TAIL_STDS * targets[k]).sum()) for k, v in convs.items())
    total = sum(v.numel() for v in convs.values())
    return {
        "conv_weight": {
            k: {
                "n": v.numel(),
                "std_over_target": float(v.std()) / targets[k],
                "mean_over_target": float(v.mean()) / targets[k],
            }
            for k, v in convs.items()
        },
        "conv_weight_beyond_3_target": {"n": total, "fraction": beyond / total},
        "fc_weight": {"n": fc.numel(), "std": float(fc.std()), "mean": float(fc.mean())},
        "values": {kind: sorted(v) for kind, v in values.items()},
    }


def rel_err(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("arch", ["resnet50", "resnet101", "resnet152"])
def test_state_dict_keys_shapes_and_dtypes_are_the_seeds(arch: str) -> None:
    seed = fixture()["networks"][arch]
    assert resnet_torch.DEPTHS[arch] == (seed["block"], tuple(seed["num_block"]))
    assert shapes_of(meta_model(arch).state_dict()) == entries(arch)


@pytest.mark.parametrize("arch", ["resnet50", "resnet101", "resnet152"])
def test_a_state_dict_of_the_seeds_keys_loads_strict(arch: str) -> None:
    model = meta_model(arch)
    sd = {key: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for key, shape, dtype in entries(arch)}
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    del sd[next(iter(sd))]
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(sd, strict=True)


def test_initialisation_matches_the_seeds_within_sampling_error() -> None:
    """Each statistic is an estimate from n draws; ours and the seed's may differ by SIGMAS standard
    errors of the difference of two such estimates."""
    seed, ours = fixture()["init"], init_statistics(resnet_torch.resnet50().state_dict())
    assert list(ours["conv_weight"]) == list(seed["conv_weight"])
    for key, want in seed["conv_weight"].items():
        got, n = ours["conv_weight"][key], want["n"]
        assert got["n"] == n, key
        # the std of a sample std is std / sqrt(2n); of a sample mean std / sqrt(n)
        assert abs(got["std_over_target"] - want["std_over_target"]) < SIGMAS / np.sqrt(n), key
        assert abs(got["mean_over_target"] - want["mean_over_target"]) < SIGMAS * np.sqrt(2 / n), key
    want, got = seed["conv_weight_beyond_3_target"], ours["conv_weight_beyond_3_target"]
    assert got["n"] == want["n"] and want["fraction"] > 0  # an untruncated normal has a tail
    assert abs(got["fraction"] - want["fraction"]) < SIGMAS * np.sqrt(2 * want["fraction"] / want["n"])
    want, got = seed["fc_weight"], ours["fc_weight"]
    assert got["n"] == want["n"]
    assert abs(got["std"] - want["std"]) < SIGMAS * want["std"] / np.sqrt(want["n"])
    assert abs(got["mean"] - want["mean"]) < SIGMAS * want["std"] * np.sqrt(2 / want["n"])
    assert ours["values"] == seed["values"]


@pytest.fixture
def one_torch_thread() -> Any:
    """Small forwards on one thread: two OpenMP threads on a busy 2-core machine spin far more CPU time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_seed_weights_load_strict_and_give_the_seeds_outputs(one_torch_thread: Any) -> None:
    """The seed's ResNet-50 outputs, recorded in float64, from the same weights in resnet_torch: the
    same network, layer for layer, in eval mode, in train mode and in the running statistics it leaves."""
    want = fixture()["outputs"]
    model = resnet_torch.resnet50(init_weights=False).double()
    result = model.load_state_dict(recipe_state_dict(entries("resnet50"), want["weight_seed"]), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = recipe_input(want["input_seed"], want["input_shape"])
    with torch.no_grad():
        eval_logits = model.eval()(x)
        train_logits = model.train()(x)
    assert rel_err(eval_logits, want["eval_logits"]) < FP64_TOL
    assert rel_err(train_logits, want["train_logits"]) < FP64_TOL
    sd = model.state_dict()
    seed_stats = want["running_stats_after_train_call"]
    got = [[float(sd[f"{m}.running_mean"].sum()), float(sd[f"{m}.running_var"].sum())] for m in seed_stats]
    assert rel_err(got, [v[:2] for v in seed_stats.values()]) < FP64_TOL
    assert [int(sd[f"{m}.num_batches_tracked"]) for m in seed_stats] == [v[2] for v in seed_stats.values()]
