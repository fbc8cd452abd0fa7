"""Train-mode parity: logits and running statistics, cross-entropy gradients, SGD steps."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from resnet_arch import BN_STATS, STAGE_OUTPUTS

from ..conversion.rules import torch_layout
from .compare import CheckResult, errors, grouped_errors, limit, numpy_of_jax, numpy_of_torch, stage_errors
from .pairs import Batch, Pair, pair_result
from .precision import GRADIENTS, RUNNING_STATS, SGD, TRAIN_LOGITS
from .reference import seed_named, torch_stages

# SGD hyperparameters of the optimizer check; nonzero momentum and weight decay so both are exercised.
LEARNING_RATE = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


def _torch_train_step(model: torch.nn.Module, batch: Batch, backward: bool = True) -> dict[str, torch.Tensor]:
    """Stage outputs of one train-mode forward; with ``backward``, the loss's gradients left in ``.grad``."""
    model.zero_grad()
    with torch.set_grad_enabled(backward):
        stages = torch_stages(model, batch.x_torch)
        if backward:
            F.cross_entropy(stages["fc"], batch.y_torch).backward()
    return stages


def _bn_state(sd: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The BatchNorm buffers of a state dict, as float64 arrays under the seed's keys."""
    return {k: numpy_of_torch(v) for k, v in seed_named(sd).items() if k.rsplit(".", 1)[-1] in BN_STATS}


def _gradients(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Every parameter's ``.grad`` as a float64 array, by the seed's state-dict key."""
    grads = {}
    for key, p in model.named_parameters():
        if p.grad is None:
            raise RuntimeError(f"{key} has no gradient after the backward pass")
        grads[key] = numpy_of_torch(p.grad)
    return seed_named(grads)


def _diagnosis(forward: dict[str, float], by_stage: dict[str, float], tol: float) -> tuple[dict[str, float], str]:
    """Forward outputs first (a forward mismatch spoils every gradient); else tensors in backprop order."""
    if any(not e <= tol for e in forward.values()):
        return forward, "forward outputs (train mode)"
    return dict(reversed(list(by_stage.items()))), "tensors by stage, in backpropagation order"


def _float64_reference(pair: Pair, batch: Batch, backward: bool) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The same train-mode call by torch in float64: the answer float32 rounding is measured against."""
    model = copy.deepcopy(pair.torch_model).to(torch.float64).train()
    stages = _torch_train_step(model, dataclasses.replace(batch, x_torch=batch.x_torch.to(torch.float64)), backward)
    return model, stages


def _flax_arrays(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A Flax tree's leaves as float64 arrays under torch's state-dict keys, in torch layout, unchecked."""
    return {k: np.asarray(v, np.float64) for k, v in torch_layout(variables).items()}


def check_train(pair: Pair, batch: Batch, with_gradients: bool) -> list[CheckResult]:
    """Train-mode logits, the running statistics (and counters) one train-mode call leaves, and
    (``with_gradients``) gradients.

    In float32 modes each result also carries torch's own error against torch in float64 (its floor),
    so rounding that the problem amplifies is told apart from a mismatch.
    """
    model = copy.deepcopy(pair.torch_model).train()
    t_stages = _torch_train_step(model, batch, backward=with_gradients)
    variables = pair.flax.variables
    grads, f_stats, f_stages = pair.flax.train_step(
        variables["params"], variables["batch_stats"], batch.x_jax, batch.y_jax, with_gradients
    )
    measure_floor = pair.mode.torch_dtype == torch.float32
    if measure_floor:
        model64, stages64 = _float64_reference(pair, batch, backward=with_gradients)
    forward = stage_errors(t_stages, f_stages)
    logits = ([numpy_of_jax(f_stages["fc"])], [numpy_of_torch(t_stages["fc"])])
    floor = errors(logits[1], [numpy_of_torch(stages64["fc"])])[1] if measure_floor else 0.0
    results = [pair_result(pair, TRAIN_LOGITS, *logits, forward, "forward outputs (train mode)", floor)]
    ref = _bn_state(model.state_dict())
    got = _flax_arrays({"batch_stats": f_stats})
    by_stage = grouped_errors(got, ref, STAGE_OUTPUTS)
    stats = ([got[k] for k in ref], [ref[k] for k in ref])
    if measure_floor:
        ref64 = _bn_state(model64.state_dict())
        floor = errors(stats[1], [ref64[k] for k in ref])[1]
    results.append(pair_result(pair, RUNNING_STATS, *stats, by_stage, "running statistics by stage", floor))
    if with_gradients:
        ref = _gradients(model)
        got = _flax_arrays({"params": grads})
        if measure_floor:
            ref64 = _gradients(model64)
            floor = errors([ref[k] for k in ref], [ref64[k] for k in ref])[1]
        bound = limit(pair.mode.tolerances[GRADIENTS], floor)
        stages, basis = _diagnosis(forward, grouped_errors(got, ref, STAGE_OUTPUTS), bound)
        results.append(pair_result(pair, GRADIENTS, [got[k] for k in ref], [ref[k] for k in ref], stages, basis, floor))
    return results


def _torch_sgd(model: torch.nn.Module, batches: list[Batch]) -> dict[str, np.ndarray]:
    """The state dict (float64 arrays, seed keys) of a train-mode model after one torch.optim.SGD step per batch."""
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    for batch in batches:
        _torch_train_step(model, batch)
        opt.step()
    return {k: numpy_of_torch(v) for k, v in seed_named(model.state_dict()).items()}


def check_sgd(pair: Pair, batches: list[Batch], forward: dict[str, float]) -> CheckResult:
    """Parameters and BatchNorm state after one SGD step per batch: torch.optim.SGD against the Flax
    side's ``torch_sgd`` steps; ``forward`` (the train-mode stage errors) comes first in the diagnosis.

    In float32 modes the result carries torch's own error against the same steps in float64 (floor).
    """
    ref = _torch_sgd(copy.deepcopy(pair.torch_model).train(), batches)
    steps = [(b.x_jax, b.y_jax) for b in batches]
    variables = pair.flax.sgd_steps(steps, LEARNING_RATE, MOMENTUM, WEIGHT_DECAY)
    floor = 0.0
    if pair.mode.torch_dtype == torch.float32:
        model64 = copy.deepcopy(pair.torch_model).to(torch.float64).train()
        ref64 = _torch_sgd(model64, [dataclasses.replace(b, x_torch=b.x_torch.to(torch.float64)) for b in batches])
        floor = errors([ref[k] for k in ref], [ref64[k] for k in ref])[1]
    got = _flax_arrays(variables)
    bound = limit(pair.mode.tolerances[SGD], floor)
    stages, basis = _diagnosis(forward, grouped_errors(got, ref, STAGE_OUTPUTS), bound)
    return pair_result(pair, SGD, [got[k] for k in ref], [ref[k] for k in ref], stages, basis, floor)
