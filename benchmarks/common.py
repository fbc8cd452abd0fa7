"""What every benchmarked implementation shares: the run settings, a timed step, and the clock."""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

# The trainer's recipe every train row follows (resnet_train.presets): resnet-train's step on the Flax side,
# the same recipe written as a PyTorch user would on the torch side.
PRESET = "imagenet-resnet50"
# The speed levers a benchmark row can add to the trainer's step: name -> resnet-train options
# (resnet_flax.levers, docs/performance.md); a row "resnet_flax+NAME". NO_LEVERS is the trainer's own step.
NO_LEVERS = ""
ALL_LEVERS = "levers"
LEVERS: dict[str, dict[str, Any]] = {
    NO_LEVERS: {},
    "max_pool_argmax_grad": {"max_pool_argmax_grad": True},
    "space_to_depth_stem": {"space_to_depth_stem": True},
    "matmul_1x1": {"matmul_1x1": True},
    "bn_two_pass": {"bn_two_pass": True},
    ALL_LEVERS: {"max_pool_argmax_grad": True, "space_to_depth_stem": True, "matmul_1x1": True},
}
# SGD with momentum and weight decay, the same on both sides (torch.optim.SGD and optax).
LEARNING_RATE = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4


@dataclasses.dataclass(frozen=True)
class Settings:
    """One benchmark configuration: model, batch, image size, compute dtype and device."""

    arch: str
    batch: int
    size: int
    dtype: str  # "fp32" or "bf16"
    device: str  # "cpu" or "gpu"
    num_classes: int
    small_stem: bool = False  # the 3x3/1 stem without max-pool, as resnet-train's default model
    seed: int = 0


@dataclasses.dataclass
class Step:
    """One implementation in one mode: ``run`` queues a call of ``steps_per_call`` steps (one batch
    each), ``sync`` waits until the device is done."""

    impl: str
    mode: str  # "train" or "infer"
    run: Callable[[], None]
    sync: Callable[[], None]
    steps_per_call: int = 1


def warm_up(step: Step, calls: int) -> float:
    """Run ``calls`` untimed calls (at least one); return the seconds of the first, which compiles."""
    start = time.perf_counter()
    step.run()
    step.sync()
    first = time.perf_counter() - start
    for _ in range(max(calls - 1, 0)):
        step.run()
    step.sync()
    return first


def time_repeat(step: Step, calls: int) -> tuple[float, float]:
    """Wall and process-CPU seconds per step over ``calls`` queued calls of ``step.steps_per_call`` steps.

    The clock stops only once the device has finished (``sync``), so asynchronous dispatch in
    JAX and CUDA cannot hide work.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(calls):
        step.run()
    step.sync()
    n = calls * step.steps_per_call
    return (time.perf_counter() - start) / n, (time.process_time() - cpu_start) / n


def _summary(first: float, repeats: list[tuple[float, float]]) -> dict[str, float | list[float]]:
    walls = [wall for wall, _ in repeats]
    return {
        "first_step_s": first,
        "step_s": statistics.median(walls),
        "step_s_all": walls,
        "cpu_s": statistics.median(cpu for _, cpu in repeats),
    }


def time_steps(step: Step, warmup: int, steps: int, repeats: int) -> dict[str, float | list[float]]:
    """Seconds per step over ``steps`` queued calls, after ``warmup`` calls; median over ``repeats``.
    Compilation happens in the first warm-up call and is timed apart."""
    first = warm_up(step, warmup)
    return _summary(first, [time_repeat(step, steps) for _ in range(repeats)])


def time_interleaved(
    steps: list[Step], firsts: list[float], calls: int, repeats: int
) -> list[dict[str, float | list[float]]]:
    """``time_steps`` for several warmed-up steps at once: round r times each step once, in an order
    rotated by r, so drift and order effects (clocks, caches, other jobs) fall on all of them alike."""
    timings: list[list[tuple[float, float]]] = [[] for _ in steps]
    for r in range(repeats):
        for i in [(r + k) % len(steps) for k in range(len(steps))]:
            timings[i].append(time_repeat(steps[i], calls))
    return [_summary(first, t) for first, t in zip(firsts, timings, strict=True)]


def time_latency(step: Step, warmup: int, calls: int) -> dict[str, float]:
    """Milliseconds per call when every call waits for its result (no queueing): median and min,
    and the median CPU time of this process per call (all its threads; on a shared machine it
    counts the work done where wall time also counts waiting for a core)."""
    warm_up(step, warmup)
    times, cpu_times = [], []
    for _ in range(calls):
        start, cpu_start = time.perf_counter(), time.process_time()
        step.run()
        step.sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "cpu_ms": 1e3 * statistics.median(cpu_times),
    }


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = (line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
            return next(names, platform.processor())
    except OSError:
        return platform.processor()
