"""XLA's cost analysis of resnet-train's compiled train step: FLOPs and bytes accessed of the ResNet-50 bf16
step (batch 256 at 224 by default), for the trainer's model, each speed lever alone and all together, and
optionally for a reference Flax ResNet-50 given as a file.

    python benchmarks/cost_analysis.py --json docs/cost-analysis-cpu.json [--reference FILE.py]

Nothing runs: each step is lowered and compiled for the default backend (abstract inputs, so batch 256
needs no memory for data) and ``compiled.cost_analysis()`` read. The figures are XLA's estimates for
that backend's program (the CPU's differ from a GPU's), comparable between rows of one run.

``--reference`` names a Python file defining a linen module class (``--reference-class``, default
ResNet50) called as ``module(x, train=...)`` on float32 NHWC images, with flax's own BatchNorm; only
the file's class definitions are executed. Its step is the plain one such a file trains with:
softmax cross-entropy on integer labels, SGD with momentum 0.9 and weight decay 1e-4 added to the
gradient, the BatchNorm statistics returned.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import functools
import json
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import optax

from benchmarks import flax_steps
from benchmarks.common import (
    ALL_LEVERS,
    LEARNING_RATE,
    LEVERS,
    MOMENTUM,
    NO_LEVERS,
    PRESET,
    WEIGHT_DECAY,
    Settings,
    cpu_model,
)
from resnet_train import steps
from resnet_train.config import TrainConfig
from resnet_train.data import steps_per_epoch
from resnet_train.feeds import IMAGENET_TRAIN_IMAGES
from resnet_train.optim import make_optimizer

# The trainer's model with every lever off: the fused one-pass BatchNorm (the trainer's default) and every
# convolution an XLA convolution (on the CPU the trainer's default runs 1x1 convolutions as products).
BASE: dict[str, Any] = {"matmul_1x1": False}
# Row name -> TrainConfig fields on top of BASE: the trainer, its plain (unfused) BatchNorm, and each speed
# lever of benchmarks.common.LEVERS (the trainer's own step and "all levers" under the names these rows keep).
LEVER_ROW_NAMES = {NO_LEVERS: "trainer", ALL_LEVERS: "all_levers"}
ROWS: dict[str, dict[str, Any]] = {
    LEVER_ROW_NAMES[NO_LEVERS]: LEVERS[NO_LEVERS],
    "plain_batchnorm": {"fused_bn": False},
    **{LEVER_ROW_NAMES.get(name, name): fields for name, fields in LEVERS.items() if name != NO_LEVERS},
}
# The figures kept from cost_analysis() (its other keys are per-operand breakdowns).
COST_KEYS = ("flops", "bytes accessed", "transcendentals")
REFERENCE_MODULE = "cost_analysis_reference"
REFERENCE_NAME = "reference: a minimal Flax ResNet-50 written independently (flax nn.BatchNorm, nn.Conv)"


def trainer_config(args: argparse.Namespace, **levers: Any) -> TrainConfig:
    """The benchmarks' `resnet-train --preset imagenet-resnet50 --dataset synthetic` (``flax_steps``) at the
    run's batch, size and dtype, with BASE and ``levers``."""
    settings = Settings("resnet50", args.batch, args.size, args.dtype, "cpu", args.num_classes)
    return dataclasses.replace(flax_steps.trainer_config(settings), **{**BASE, **levers})


def _costs(compiled: Any) -> dict[str, Any]:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jaxlibs: one dict per program
        analysis = analysis[0]
    out = {k.replace(" ", "_"): float(analysis[k]) for k in COST_KEYS if k in analysis}
    memory = compiled.memory_analysis()
    if memory is not None:
        out["temp_bytes"] = int(memory.temp_size_in_bytes)
    out["hlo_lines"] = compiled.as_text().count("\n")
    return out


def compile_costs(fn: Callable[..., Any], *specs: Any, donate: int | tuple[int, ...] = 0) -> dict[str, Any]:
    """Lower and compile ``fn`` for ``specs`` (abstract values) under jit, the ``donate`` arguments donated;
    its costs and the seconds taken."""
    start = time.perf_counter()
    jitted = jax.jit(fn, donate_argnums=donate)
    compiled = jitted.lower(*specs).compile()
    return {**_costs(compiled), "compile_s": round(time.perf_counter() - start, 1)}


def trainer_step_costs(args: argparse.Namespace, levers: dict[str, Any]) -> dict[str, Any]:
    """The costs of ``resnet_train.steps.train_step`` (the step `resnet-train` jits) for one lever set."""
    config = trainer_config(args, **levers)
    tx = make_optimizer(config, steps_per_epoch(IMAGENET_TRAIN_IMAGES, config.batch_size))
    state = jax.eval_shape(lambda: steps.create_train_state(config, args.num_classes, tx, (0.5,) * 3, (0.25,) * 3))
    images = jax.ShapeDtypeStruct((args.batch, args.size, args.size, 3), jnp.uint8)
    labels = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
    return compile_costs(functools.partial(steps.train_step, config=config), state, images, labels)


def load_reference(path: Path, class_name: str) -> Any:
    """The linen module class ``class_name`` of the file at ``path``, from its class definitions alone."""
    from functools import partial

    import flax.linen as nn

    tree = ast.parse(path.read_text(), filename=str(path))
    classes: list[ast.stmt] = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    module = types.ModuleType(REFERENCE_MODULE)  # registered: linen's dataclasses look their module up
    module.__dict__.update(partial=partial, nn=nn, jnp=jnp, jax=jax)
    sys.modules[REFERENCE_MODULE] = module
    exec(compile(ast.Module(body=classes, type_ignores=[]), str(path), "exec"), module.__dict__)  # noqa: S102
    namespace = module.__dict__
    if class_name not in namespace:
        found = ", ".join(getattr(c, "name", "") for c in classes) or "none"
        raise SystemExit(f"--reference {path}: no class {class_name!r} (classes: {found}); name it --reference-class")
    return namespace[class_name]


def reference_step_costs(args: argparse.Namespace, model_class: Any) -> dict[str, Any]:
    """The costs of a plain Flax train step of the reference model (see the module docstring)."""
    model = model_class(num_classes=args.num_classes, dtype=jnp.bfloat16 if args.dtype == "bf16" else jnp.float32)
    x = jax.ShapeDtypeStruct((args.batch, args.size, args.size, 3), jnp.float32)
    y = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, args.size, args.size, 3)), train=False)
    )
    tx = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LEARNING_RATE, momentum=MOMENTUM))
    opt_state = jax.eval_shape(tx.init, variables["params"])

    def step(params: Any, stats: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, ...]:
        def loss_fn(p: Any) -> tuple[jax.Array, Any]:
            logits, new = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
            return loss, new["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return compile_costs(step, variables["params"], variables["batch_stats"], opt_state, x, y, donate=(0, 1, 2))


def machine() -> dict[str, Any]:
    import flax

    return {
        "cpu": cpu_model(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "flax": flax.__version__,
        "python": sys.version.split()[0],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256, help="global batch (default 256)")
    p.add_argument("--size", type=int, default=224, help="square image side (default 224)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="compute dtype (default bf16)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier width (default 1000)")
    p.add_argument("--variants", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    p.add_argument("--reference", type=Path, default=None, help="a Python file with a Flax ResNet-50 to compare")
    p.add_argument("--reference-class", default="ResNet50", help="its linen module class (default ResNet50)")
    p.add_argument(
        "--command",
        default=None,
        help="the command recorded in the JSON (default: this one; give it to hide a local path)",
    )
    p.add_argument("--json", type=Path, required=True, help="where the figures go (rewritten after every row)")
    args = p.parse_args(argv)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_list if v not in ROWS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; expected some of {', '.join(ROWS)}")
    if args.reference is not None and not args.reference.is_file():
        p.error(f"--reference {args.reference}: no such file")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from parity.checks.report import write_json

    report: dict[str, Any] = {
        "what": f"XLA cost analysis of the compiled ResNet-50 train step, {args.dtype}, "
        f"batch {args.batch} at {args.size}x{args.size}",
        "command": args.command or " ".join(["python", "benchmarks/cost_analysis.py", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "trainer": f"resnet-train --preset {PRESET} --dataset synthetic; every row: {BASE} unless it sets otherwise",
        "rows": [],
        "errors": [],
    }
    jobs: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        (name, functools.partial(trainer_step_costs, args, ROWS[name])) for name in args.variant_list
    ]
    if args.reference is not None:
        model_class = load_reference(args.reference, args.reference_class)
        jobs.append((REFERENCE_NAME, functools.partial(reference_step_costs, args, model_class)))
    for name, job in jobs:
        try:
            row = {"variant": name, **job()}
        except Exception as e:  # noqa: BLE001 - recorded, so one failed row keeps the others
            report["errors"].append({"variant": name, "error": f"{type(e).__name__}: {e}"})
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
        else:
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
        write_json(args.json, report)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
