"""What every benchmarked implementation shares: the run settings, a timed step, and the clock."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

# ImageNet channel statistics: synthetic uint8 images are normalised with them on the device,
# inside the timed step, as a real input pipeline that ships uint8 would do.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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
    seed: int = 0


@dataclasses.dataclass
class Step:
    """One implementation in one mode: ``run`` queues a step, ``sync`` waits until the device is done."""

    impl: str
    mode: str  # "train" or "infer"
    run: Callable[[], None]
    sync: Callable[[], None]


def time_steps(step: Step, warmup: int, steps: int, repeats: int) -> dict[str, float | list[float]]:
    """Seconds per step over ``steps`` queued steps, after ``warmup`` steps; median over ``repeats``.

    The clock stops only once the device has finished (``sync``), so asynchronous dispatch in
    JAX and CUDA cannot hide work; compilation happens in the first warm-up step and is timed apart.
    """
    start = time.perf_counter()
    step.run()
    step.sync()
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        step.run()
    step.sync()
    per_step, cpu_per_step = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step.run()
        step.sync()
        per_step.append((time.perf_counter() - start) / steps)
        cpu_per_step.append((time.process_time() - cpu_start) / steps)
    return {
        "first_step_s": first,
        "step_s": statistics.median(per_step),
        "step_s_all": per_step,
        "cpu_s": statistics.median(cpu_per_step),
    }


def time_latency(step: Step, warmup: int, calls: int) -> dict[str, float]:
    """Milliseconds per call when every call waits for its result (no queueing): median and min,
    and the median CPU time of this process per call (all its threads; on a shared machine it
    counts the work done where wall time also counts waiting for a core)."""
    for _ in range(max(warmup, 1)):
        step.run()
        step.sync()
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
