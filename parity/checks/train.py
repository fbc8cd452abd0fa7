"""Train-mode parity: logits and running statistics, cross-entropy gradients, SGD steps."""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax
import torch
import torch.nn.functional as F

import resnet_flax
import resnet_torch
from resnet_arch import BN_STATS, NNX, STAGE_OUTPUTS

from ..conversion.convert import flax_to_torch
from . import nnx as nnx_checks
from .compare import FLOOR_FACTOR, CheckResult, errors, grouped_errors, numpy_of_jax, numpy_of_torch, stage_errors
from .optim import torch_sgd
from .pairs import JIT_CACHE_SIZE, Batch, Pair, pair_result
from .precision import GRADIENTS, RUNNING_STATS, SGD, TRAIN_LOGITS, jax_device

# SGD hyperparameters of the optimizer check; nonzero momentum and weight decay so both are exercised.
LEARNING_RATE = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


def _train_forward(model: resnet_flax.ResNet) -> Callable[..., tuple[jax.Array, Any]]:
    """(params, batch_stats, x, y) -> (mean cross-entropy, (updated batch_stats, stage outputs)).

    One function serves the train-mode, gradient and SGD checks, so XLA compiles it once per model.
    The loss is F.cross_entropy's: softmax cross-entropy with integer labels, averaged over the batch.
    """

    def loss_fn(params: Any, batch_stats: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Any]:
        stages, updated = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, return_stages=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(stages["fc"], y).mean()
        return loss, (updated["batch_stats"], stages)

    return loss_fn


@functools.lru_cache(maxsize=JIT_CACHE_SIZE)
def _jitted_train(model: resnet_flax.ResNet, with_gradients: bool) -> Callable[..., tuple[Any, Any]]:
    loss_fn = _train_forward(model)
    if with_gradients:
        return jax.jit(jax.grad(loss_fn, has_aux=True))
    # The forward alone compiles several times faster than its gradient.
    return jax.jit(lambda *args: (None, loss_fn(*args)[1]))


@dataclasses.dataclass
class FlaxTrainStep:
    """One jitted train-mode call: gradients (when asked for), new batch_stats and stage outputs."""

    pair: Pair
    with_gradients: bool = True

    def __call__(self, params: Any, batch_stats: Any, batch: Batch) -> tuple[Any, Any, dict[str, jax.Array]]:
        if self.pair.api == NNX:
            fn = nnx_checks.jitted_train(nnx_checks.train_graphdef(self.pair.flax_model), self.with_gradients)
        else:
            fn = _jitted_train(self.pair.flax_model, self.with_gradients)
        grads, (batch_stats, stages) = fn(params, batch_stats, batch.x_jax, batch.y_jax)
        return grads, batch_stats, stages


def _torch_train_step(model: resnet_torch.ResNet, batch: Batch, backward: bool = True) -> dict[str, torch.Tensor]:
    """Stage outputs of one train-mode forward; with ``backward``, the loss's gradients left in ``.grad``."""
    model.zero_grad()
    with torch.set_grad_enabled(backward):
        stages = model.forward_stages(batch.x_torch)
        if backward:
            F.cross_entropy(stages["fc"], batch.y_torch).backward()
    return stages


def _bn_state(sd: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The BatchNorm buffers of a state dict, as float64 arrays."""
    return {k: numpy_of_torch(v) for k, v in sd.items() if k.rsplit(".", 1)[-1] in BN_STATS}


def _gradients(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Every parameter's ``.grad`` as a float64 array, by state-dict key."""
    grads = {}
    for key, p in model.named_parameters():
        if p.grad is None:
            raise RuntimeError(f"{key} has no gradient after the backward pass")
        grads[key] = numpy_of_torch(p.grad)
    return grads


def _diagnosis(forward: dict[str, float], by_stage: dict[str, float], tol: float) -> tuple[dict[str, float], str]:
    """Forward outputs first (a forward mismatch spoils every gradient); else tensors in backprop order."""
    if any(not e <= tol for e in forward.values()):
        return forward, "forward outputs (train mode)"
    return dict(reversed(list(by_stage.items()))), "tensors by stage, in backpropagation order"


def _float64_reference(pair: Pair, batch: Batch, backward: bool) -> tuple[resnet_torch.ResNet, dict[str, torch.Tensor]]:
    """The same train-mode call by torch in float64: the answer float32 rounding is measured against."""
    model = copy.deepcopy(pair.torch_model).to(torch.float64).train()
    stages = _torch_train_step(model, dataclasses.replace(batch, x_torch=batch.x_torch.to(torch.float64)), backward)
    return model, stages


def check_train(pair: Pair, batch: Batch, step: FlaxTrainStep) -> list[CheckResult]:
    """Train-mode logits, the running statistics (and counters) one train-mode call leaves, and gradients.

    In float32 modes each result also carries torch's own error against torch in float64 (its floor),
    so rounding that the problem amplifies is told apart from a mismatch.
    """
    model = copy.deepcopy(pair.torch_model).train()
    t_stages = _torch_train_step(model, batch, backward=step.with_gradients)
    grads, f_stats, f_stages = step(pair.variables["params"], pair.variables["batch_stats"], batch)
    measure_floor = pair.mode.torch_dtype == torch.float32
    if measure_floor:
        model64, stages64 = _float64_reference(pair, batch, backward=step.with_gradients)
    forward = stage_errors(t_stages, f_stages)
    logits = ([numpy_of_jax(f_stages["fc"])], [numpy_of_torch(t_stages["fc"])])
    floor = errors(logits[1], [numpy_of_torch(stages64["fc"])])[1] if measure_floor else 0.0
    results = [pair_result(pair, TRAIN_LOGITS, *logits, forward, "forward outputs (train mode)", floor)]
    ref = _bn_state(model.state_dict())
    got = _bn_state(flax_to_torch({"params": pair.variables["params"], "batch_stats": f_stats}))
    by_stage = grouped_errors(got, ref, STAGE_OUTPUTS)
    stats = ([got[k] for k in ref], [ref[k] for k in ref])
    if measure_floor:
        ref64 = _bn_state(model64.state_dict())
        floor = errors(stats[1], [ref64[k] for k in ref])[1]
    results.append(pair_result(pair, RUNNING_STATS, *stats, by_stage, "running statistics by stage", floor))
    if step.with_gradients:
        ref = _gradients(model)
        sd = flax_to_torch({"params": grads, "batch_stats": f_stats})
        got = {k: numpy_of_torch(sd[k]) for k in ref}
        if measure_floor:
            ref64 = _gradients(model64)
            floor = errors([ref[k] for k in ref], [ref64[k] for k in ref])[1]
        limit = max(pair.mode.tolerances[GRADIENTS], FLOOR_FACTOR * floor)
        stages, basis = _diagnosis(forward, grouped_errors(got, ref, STAGE_OUTPUTS), limit)
        results.append(pair_result(pair, GRADIENTS, [got[k] for k in ref], [ref[k] for k in ref], stages, basis, floor))
    return results


@functools.lru_cache(maxsize=JIT_CACHE_SIZE)
def _jitted_sgd(
    learning_rate: float, momentum: float, weight_decay: float
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Jitted (init, update) of torch_sgd; update applies the updates and returns (params, state)."""
    tx = torch_sgd(learning_rate, momentum, weight_decay)

    def update(grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(tx.init), jax.jit(update)


def _torch_sgd(model: resnet_torch.ResNet, batches: list[Batch]) -> dict[str, np.ndarray]:
    """The state dict (float64 arrays) of a train-mode model after one torch.optim.SGD step per batch."""
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    for batch in batches:
        _torch_train_step(model, batch)
        opt.step()
    return {k: numpy_of_torch(v) for k, v in model.state_dict().items()}


def _linen_sgd(pair: Pair, batches: list[Batch], step: FlaxTrainStep) -> dict[str, Any]:
    """The linen variables after one optax SGD step per batch, gradients from ``step``."""
    init, update = _jitted_sgd(LEARNING_RATE, MOMENTUM, WEIGHT_DECAY)
    params, stats = pair.variables["params"], pair.variables["batch_stats"]
    opt_state = jax.device_put(init(params), jax_device(pair.device))
    for batch in batches:
        grads, stats, _ = step(params, stats, batch)
        params, opt_state = update(grads, opt_state, params)
    return {"params": params, "batch_stats": stats}


def check_sgd(pair: Pair, batches: list[Batch], step: FlaxTrainStep, forward: dict[str, float]) -> CheckResult:
    """Parameters and BatchNorm state after one SGD step per batch, torch.optim.SGD against optax
    (an NNX pair: ``nnx.Optimizer`` over the same chain).

    In float32 modes the result carries torch's own error against the same steps in float64 (floor).
    """
    ref = _torch_sgd(copy.deepcopy(pair.torch_model).train(), batches)
    if pair.api == NNX:
        steps = [(b.x_jax, b.y_jax) for b in batches]
        variables = nnx_checks.sgd_steps(pair.flax_model, steps, LEARNING_RATE, MOMENTUM, WEIGHT_DECAY)
    else:
        variables = _linen_sgd(pair, batches, step)

    floor = 0.0
    if pair.mode.torch_dtype == torch.float32:
        model64 = copy.deepcopy(pair.torch_model).to(torch.float64).train()
        ref64 = _torch_sgd(model64, [dataclasses.replace(b, x_torch=b.x_torch.to(torch.float64)) for b in batches])
        floor = errors([ref[k] for k in ref], [ref64[k] for k in ref])[1]
    sd = flax_to_torch(variables)
    got = {k: numpy_of_torch(sd[k]) for k in ref}
    limit = max(pair.mode.tolerances[SGD], FLOOR_FACTOR * floor)
    stages, basis = _diagnosis(forward, grouped_errors(got, ref, STAGE_OUTPUTS), limit)
    return pair_result(pair, SGD, [got[k] for k in ref], [ref[k] for k in ref], stages, basis, floor)
