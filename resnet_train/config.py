"""Every training hyperparameter in one dataclass; each field is a `resnet-train` flag."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from parity.conversion.arch import ArchSpec
from parity.conversion.names import LAYOUTS
from resnet_arch import APIS, ARCH_NAMES, DEEP_STEM, LINEN, VARIANTS, resolve_arch

from .presets import PRESETS, preset_values

DATASETS = ("digits", "cifar10", "imagefolder", "synthetic")
# Datasets held in memory as uint8 arrays and augmented on the device; an image folder streams
# through Grain workers (augmented on the CPU) and synthetic batches are made on the device.
IN_MEMORY = ("digits", "cifar10")
OPTIMIZERS = ("sgd", "adamw")
# Computation dtypes training offers (names from resnet_arch.DTYPES); parameters stay float32.
DTYPES = ("fp32", "bf16")
ON_NONFINITE = ("stop", "skip")
# What --freeze keeps fixed: nothing; every BatchNorm (scale, bias and running statistics); all but the classifier.
FREEZE_NONE, FREEZE_BN, FREEZE_BACKBONE = "none", "bn", "backbone"
FREEZES = (FREEZE_NONE, FREEZE_BN, FREEZE_BACKBONE)
# The architecture a run trains unless --arch, --small-stem, a preset or --init-from's weights say otherwise.
DEFAULT_ARCH = {"arch": "resnet18", "small_stem": True}
# Largest float32: the step computes in float32, where a larger option value would become inf.
FLOAT32_MAX = 3.4028234663852886e38
# Random-crop padding for 32x32-class images, as in the usual CIFAR recipe.
DEFAULT_CROP_PADDING = 4
# Fields with a fixed set of values (checked in TrainConfig, offered as choices on the command line).
CHOICES = {
    "dataset": DATASETS,
    "optimizer": OPTIMIZERS,
    "dtype": DTYPES,
    "on_nonfinite": ON_NONFINITE,
    "arch": ARCH_NAMES,
    "api": APIS,
    "freeze": FREEZES,
    "export_layout": LAYOUTS,
}


def _field(default: Any, help: str) -> Any:
    """A config field whose help text is its comment and its flag's --help line."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What `resnet-train` does; every field is a flag. The defaults train digits to ~98% test accuracy."""

    # data
    dataset: str = _field(
        "digits",
        "digits (scikit-learn, built in), cifar10, imagefolder (streamed) or synthetic (random images made on the "
        "device, to time the step alone)",
    )
    data_dir: str = _field("", "folder of the cifar10 python batches or of the image folder")
    image_size: int = _field(
        32,
        "square side of the training images: digits are resized to it, image folders cropped to it "
        "(RandomResizedCrop; evaluation resizes to 8/7 of it and cuts the centre), cifar10 stays 32",
    )
    test_fraction: float = _field(0.2, "held-out share when the data has no test split of its own")
    train_limit: int = _field(0, "use only the first N shuffled training images (0: all)")
    crop_padding: int | None = _field(
        None, "random crop on the device: pad by N pixels and crop back (None: 4 for cifar10, 0 for digits)"
    )
    hflip: bool | None = _field(None, "random horizontal flips (default: on, except for digits)")
    workers: int = _field(-1, "Grain worker processes decoding an image folder (-1: one per CPU core; 0: none)")
    # model
    arch: str = _field(
        DEFAULT_ARCH["arch"], "builder name: " + ", ".join(ARCH_NAMES) + " (with --init-from: the weights')"
    )
    small_stem: bool = _field(
        DEFAULT_ARCH["small_stem"],
        "3x3/1 stem without max-pool, for small images like 32x32 (with --init-from: the weights')",
    )
    zero_init_residual: bool = _field(False, "start each block's last BatchNorm scale at zero")
    dtype: str = _field("fp32", "computation dtype (params stay float32): fp32 or bf16")
    fused_bn: bool = _field(
        True, "train-mode BatchNorm with one-pass statistics and a closed-form backward (same function, faster)"
    )
    api: str = _field(LINEN, "Flax API of the model: linen (resnet_flax) or nnx (resnet_flax.nnx, nnx.Optimizer)")
    # fine-tuning
    init_from: str = _field(
        "",
        "start from these weights: a .pth/.safetensors/.msgpack file or a model-hub directory in any layout (seed, "
        "torchvision, timm, transformers); a classifier for another number of classes is replaced by a fresh one",
    )
    freeze: str = _field(
        FREEZE_NONE,
        "what stays fixed: none; bn (every BatchNorm runs on its running statistics, its scale and bias fixed); "
        "backbone (only the classifier trains, BatchNorm as with bn)",
    )
    backbone_lr_scale: float = _field(1.0, "the backbone's learning rate as a multiple of the classifier's")
    export_layout: str | None = _field(
        None,
        "key names of the export: seed, torchvision, timm or transformers (a model-hub directory; timm too when "
        "--init-from was one) (None: --init-from's layout, else seed)",
    )
    # optimization
    epochs: int = _field(2, "epochs; the learning-rate schedule spans all of them")
    batch_size: int = _field(32, "global batch size, split over every device")
    optimizer: str = _field("sgd", "sgd (momentum, optional nesterov) or adamw")
    lr: float = _field(0.02, "peak learning rate")
    momentum: float = _field(0.9, "SGD momentum (AdamW's b1)")
    nesterov: bool = _field(True, "Nesterov momentum for SGD")
    weight_decay: float = _field(5e-4, "weight decay (SGD: added to the gradient; AdamW: decoupled)")
    decay_bn_bias: bool = _field(False, "also decay BatchNorm scales and biases (1-d params)")
    warmup_epochs: float = _field(0.5, "linear warm-up from 0 to --lr, then cosine decay to 0")
    label_smoothing: float = _field(0.1, "label smoothing of the cross-entropy targets")
    seed: int = _field(0, "seed of init, data order and augmentation")
    on_nonfinite: str = _field("stop", "a NaN/inf loss: stop (naming the step) or skip the update and count it")
    inject_nan_at_step: int = _field(-1, "fault injection: make the loss at this step NaN (-1: never)")
    # run
    run_dir: str = _field("runs/train", "where metrics, plot, checkpoints and the PyTorch export go")
    resume: bool = _field(False, "continue from the latest checkpoint in --run-dir")
    stop_after_epoch: int = _field(0, "end this invocation after this epoch (0: run all --epochs)")
    keep_checkpoints: int = _field(2, "keep this many latest checkpoints, plus the best one")
    export: bool = _field(True, "write model.safetensors for resnet_torch and verify it on the test set")
    progress: bool = _field(True, "a progress bar per epoch on stderr")
    log_every: int = _field(
        10, "also record training loss, accuracy, lr and images/s every N steps (0: per epoch only)"
    )
    # devices
    distributed: bool = _field(False, "call jax.distributed.initialize (multi-host)")
    coordinator_address: str = _field("", "host:port of process 0 (empty: detect from the cluster)")
    num_processes: int = _field(0, "number of processes (0: detect)")
    process_id: int = _field(-1, "this process's index (-1: detect)")
    heartbeat_timeout: int = _field(
        100, "seconds a --distributed process may go silent before the others fail, naming the cause"
    )
    # speed levers: the same function, other programs (resnet_flax.levers, docs/performance.md)
    matmul_1x1: bool | None = _field(None, "1x1 convolutions as matrix products (None: on the CPU only)")
    space_to_depth_stem: bool = _field(False, "the 7x7/2 stem as a 4x4/1 convolution on 2x2-blocked images")
    max_pool_argmax_grad: bool = _field(False, "max-pool's gradient sent through a saved argmax")
    bn_two_pass: bool = _field(False, "the fused BatchNorm's batch variance in two passes (float32 accuracy)")

    start_timeout: int = _field(
        60, "seconds a --distributed process waits for all the others to join before it fails, naming them"
    )

    def __post_init__(self) -> None:
        problems = _type_problems(self) or _range_problems(self)
        if problems:
            raise ValueError("bad training config: " + "; ".join(problems))

    @property
    def crop(self) -> int:
        """Random-crop padding: 4 for cifar10 unless asked otherwise, 0 for digits (two epochs need no
        regularising) and for the datasets that are not in memory (image folders use RandomResizedCrop)."""
        default = DEFAULT_CROP_PADDING if self.dataset == "cifar10" else 0
        return default if self.crop_padding is None else self.crop_padding

    @property
    def flip(self) -> bool:
        """Horizontal flips: on unless asked otherwise, except for digits (a mirrored 2 is no 2)."""
        return self.dataset != "digits" if self.hflip is None else self.hflip

    @property
    def device_augmentation(self) -> tuple[int, bool]:
        """(crop padding, flip) for the jitted step: in-memory datasets only (an image folder's
        augmentation happens on the CPU, and synthetic images are measured as they are)."""
        return (self.crop, self.flip) if self.dataset in IN_MEMORY else (0, False)

    @property
    def running_bn(self) -> bool:
        """Whether training runs BatchNorm on its running statistics (eval mode, statistics never updated)."""
        return self.freeze != FREEZE_NONE

    def to_json(self, **extra: Any) -> str:
        """Every field as a JSON object, with `extra` keys beside them (config.json adds the class names)."""
        return json.dumps({**dataclasses.asdict(self), **extra}, sort_keys=True)


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _type_problems(config: TrainConfig) -> list[str]:
    """Each field of its declared type (bool is no int here, an int is a float); floats finite in float32."""
    problems = []
    for name, hint in _field_types().items():
        value = getattr(config, name)
        if value is None and type(None) in typing.get_args(hint):  # the optional fields' "not set"
            continue
        kinds = tuple(k for k in typing.get_args(hint) or (hint,) if k is not type(None))
        ok = isinstance(value, (int, float) if float in kinds else kinds) and not (
            isinstance(value, bool) and bool not in kinds
        )
        if not ok:
            problems.append(f"{name} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
        elif isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            problems.append(f"{name} must be a finite number (in float32's range), got {value}")
    return problems


def _range_problems(c: TrainConfig) -> list[str]:
    """Choices, bounds and combinations, once every field has its type."""
    problems = [
        f"{name} must be one of {', '.join(allowed)}, got {getattr(c, name)!r}"
        for name, allowed in CHOICES.items()
        if getattr(c, name) not in (*allowed, None)
    ]
    bounds = {
        "epochs": (c.epochs >= 1, ">= 1"),
        "batch_size": (c.batch_size >= 1, ">= 1"),
        "image_size": (c.image_size >= 1, ">= 1"),
        "keep_checkpoints": (c.keep_checkpoints >= 1, ">= 1"),
        "heartbeat_timeout": (c.heartbeat_timeout >= 1, ">= 1"),
        "start_timeout": (c.start_timeout >= 1, ">= 1"),
        "workers": (c.workers >= -1, ">= -1 (-1: one per CPU core)"),
        "log_every": (c.log_every >= 0, ">= 0 (0: never)"),
        "train_limit": (c.train_limit >= 0, ">= 0"),
        "crop_padding": ((c.crop_padding or 0) >= 0, ">= 0"),
        "seed": (c.seed >= 0, ">= 0"),
        "test_fraction": (0 < c.test_fraction < 1, "between 0 and 1"),
        "lr": (c.lr > 0, "> 0"),
        "momentum": (0 <= c.momentum < 1, "in [0, 1)"),
        "weight_decay": (c.weight_decay >= 0, ">= 0"),
        "warmup_epochs": (0 <= c.warmup_epochs < c.epochs, "in [0, epochs)"),
        "label_smoothing": (0 <= c.label_smoothing < 1, "in [0, 1)"),
        "inject_nan_at_step": (c.inject_nan_at_step >= -1, ">= -1 (-1: never)"),
        "stop_after_epoch": (0 <= c.stop_after_epoch <= c.epochs, "in [0, epochs]"),
        "num_processes": (c.num_processes >= 0, ">= 0 (0: detect)"),
        "process_id": (c.process_id >= -1, ">= -1 (-1: detect)"),
        "backbone_lr_scale": (c.backbone_lr_scale > 0, "> 0 (--freeze backbone keeps the backbone fixed)"),
    }
    problems += [f"{name} must be {rule}, got {getattr(c, name)}" for name, (ok, rule) in bounds.items() if not ok]
    if c.dataset in ("cifar10", "imagefolder") and not c.data_dir:
        problems.append(f"dataset {c.dataset} needs --data-dir")
    if c.bn_two_pass and not c.fused_bn:
        problems.append("bn_two_pass is an option of the fused BatchNorm; it needs fused_bn")
    if c.dataset not in IN_MEMORY and c.crop_padding:
        problems.append(f"crop_padding applies to {' and '.join(IN_MEMORY)}; {c.dataset} crops on the CPU")
    if c.freeze != FREEZE_NONE and not c.init_from:
        problems.append(f"--freeze {c.freeze} keeps pretrained weights fixed: it needs --init-from")
    if c.freeze == FREEZE_BACKBONE and c.backbone_lr_scale != 1.0:
        problems.append("--backbone-lr-scale has no backbone to scale under --freeze backbone")
    if c.small_stem and VARIANTS.get(c.arch, ("", {}))[1].get("stem") == DEEP_STEM:
        problems.append(
            f"--arch {c.arch} has its own (deep) stem, which the small stem cannot replace: it needs --no-small-stem"
        )
    if c.export_layout in LAYOUTS and c.arch in ARCH_NAMES:
        try:
            _arch_spec(c).check_layout(c.export_layout)
        except ValueError as e:
            problems.append(f"--export-layout {c.export_layout} cannot hold --arch {c.arch}: {e}")
    return problems


def _arch_spec(c: TrainConfig) -> ArchSpec:
    """The network ``c`` trains, as the converter describes it (its class count does not matter here)."""
    block, num_block, options = resolve_arch(c.arch, {})
    return ArchSpec(block, num_block, 1, c.small_stem, **options)


# Fields that may change between an interrupted run and its --resume without changing the result.
# run_dir: the same run reached as ./x, x/, an absolute path, or after the folder was moved. A run may
# also resume on other machines: the global batch, not the process layout, makes the result.
RESUMABLE_CHANGES = frozenset(
    {"resume", "stop_after_epoch", "progress", "export", "keep_checkpoints", "run_dir", "workers", "log_every"}
    | {"distributed", "coordinator_address", "num_processes", "process_id", "heartbeat_timeout", "start_timeout"}
)
# Fields added after runs were saved, with the value that reproduces a run whose config.json lacks them.
LATER_FIELDS = {
    "fused_bn": False,
    "api": LINEN,
    "init_from": "",
    "freeze": FREEZE_NONE,
    "backbone_lr_scale": 1.0,
    "export_layout": None,
    "matmul_1x1": None,
    "space_to_depth_stem": False,
    "max_pool_argmax_grad": False,
    "bn_two_pass": False,
}
# Values renamed after runs were saved: field -> {old value: new value}.
RENAMED_VALUES = {"dtype": {"float32": "fp32", "bfloat16": "bf16"}}


def saved_config(path: Path) -> dict[str, Any]:
    """A run's config.json in this version's fields (a missing one takes its ``LATER_FIELDS`` value, a value in
    ``RENAMED_VALUES`` is mapped); a file that is not a JSON object is a ValueError naming it."""
    try:
        loaded = json.loads(path.read_bytes())
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not JSON ({e}); a run's config.json holds its settings as one JSON object") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: a JSON {type(loaded).__name__}, not the run's settings (a JSON object)")
    saved = {**LATER_FIELDS, **loaded}
    for name, renames in RENAMED_VALUES.items():
        value = saved.get(name)
        saved[name] = renames.get(value, value) if isinstance(value, str) else value
    return saved


def _flag_type(annotation: str) -> Any:
    base = annotation.replace(" | None", "")
    return {"int": int, "float": float, "str": str, "bool": bool}[base]


class UsageError(SystemExit):
    """A bad flag: argparse's usage and message are on stderr; exits with status 2 unless caught."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        """As argparse's own, but the exception keeps the message (for the JSON line of `resnet-train`)."""
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise UsageError(message)


def parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per TrainConfig field (--no-X for booleans)."""
    p = _Parser(
        prog="resnet-train",
        description="Train the Flax ResNet with optax, then export it to PyTorch and verify the export.",
    )
    hints = _field_types()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if hints[f.name] in (bool, bool | None):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            kind = _flag_type(str(f.type))
            p.add_argument(flag, type=kind, default=f.default, choices=CHOICES.get(f.name), help=help_text)
    return p


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Command-line flags -> TrainConfig; a bad value raises UsageError after argparse's usage message.

    --preset NAME sets the defaults of the fields its recipe names (resnet_train.presets); other
    flags still override them, and --lr, unless given, follows --batch-size.
    """
    p = parser()
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named recipe: defaults for the fields it sets")
    p.set_defaults(**dict.fromkeys(DEFAULT_ARCH))  # None: not given, so --init-from's weights may decide
    flags = p.parse_known_args(argv)[0]
    preset = flags.preset
    if preset:
        p.set_defaults(**PRESETS[preset], lr=None)
    values = vars(p.parse_args(argv))
    del values["preset"]
    # The architecture fields the preset, not a flag, set: a disagreement with --init-from blames the preset.
    presets = {k: preset for k in DEFAULT_ARCH if preset and getattr(flags, k) is None and k in PRESETS[preset]}
    try:
        values.update(_architecture(values, presets))
        return TrainConfig(**(preset_values(preset, **values) if preset else values))
    except ValueError as e:
        p.error(str(e))
        raise


def _architecture(values: dict[str, Any], presets: dict[str, str]) -> dict[str, Any]:
    """arch and small_stem: as given, else --init-from's weights' (which a given value must equal), else the
    defaults. ``presets``: the fields a --preset gave, to its name."""
    given = {name: values[name] for name in DEFAULT_ARCH if values[name] is not None}
    if not values["init_from"]:
        chosen = {**DEFAULT_ARCH, **given}
        if "small_stem" not in given and VARIANTS.get(chosen["arch"], ("", {}))[1].get("stem") == DEEP_STEM:
            chosen["small_stem"] = False  # a deep stem is its own stem: the small one cannot replace it
        return chosen
    from .finetune import source_architecture  # reads the weights: torch and the converter, only when asked

    resume_dir = Path(values["run_dir"]) if values["resume"] else None
    return source_architecture(values["init_from"], given, resume_dir, presets)
