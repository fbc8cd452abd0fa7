"""Trained Flax weights -> a PyTorch checkpoint in a layout's key names, verified against resnet_torch.

The export is ``model.safetensors`` in the run directory, or, for transformers (and timm when the run
started from a timm model-hub directory), a model-hub directory ``model/`` that the layout's own loader
reads (``ResNetForImageClassification.from_pretrained``, ``timm.create_model("local-dir:...")``), its
config.json naming the classes. The safetensors metadata records the architecture, the layout, the
evaluation transform and the class names in every case. torch and parity's torch-using modules are
imported only when an export is written, so a run without one (``--no-export``) needs no torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from parity.conversion.exports import EXPORT_DIR, EXPORT_FILE, HUB_CONFIG_FILE
from parity.conversion.names import SEED, TIMM, TRANSFORMERS
from resnet_data.transforms import RESAMPLE, eval_resize_side
from resnet_flax.preprocess import normalize

from .api import TrainStateLike, step_functions
from .config import IN_MEMORY, TrainConfig
from .feeds import Feed
from .finetune import SourceRecord
from .signals import StopRequest

log = logging.getLogger(__name__)

# transformers' image processor settings (AutoImageProcessor.from_pretrained reads them), in a transformers export.
PREPROCESSOR_FILE = "preprocessor_config.json"
# BitImageProcessor resizes the shorter side and cuts the centre, as the run evaluates, at every size; the
# ConvNextImageProcessor that microsoft/resnet-50 names stretches images of 384 px and more without a crop.
IMAGE_PROCESSOR = "BitImageProcessor"
# PIL's resampling filter code for resnet_data's eval resize (transformers names filters by these codes).
RESAMPLE_CODE = int(RESAMPLE)
# safetensors metadata transformers' loader requires of a PyTorch weights file.
TORCH_FORMAT = {"format": "pt"}

# CPU fp32 eval-logit tolerance (relative, ||a-b||/||b||) from the project's tolerance table.
EXPORT_RTOL = 1e-5
# Batch size of the verification pass (memory only; results do not depend on it).
VERIFY_CHUNK = 128


class ExportMismatchError(RuntimeError):
    """resnet_torch with the exported weights does not reproduce the Flax model."""


class ExportCancelled(Exception):
    """The verification was asked to stop (a stop signal) before it finished."""


@dataclasses.dataclass(frozen=True)
class ExportCheck:
    """How resnet_torch with the exported weights compares with the Flax model on the test set."""

    rel_err: float
    mismatched_predictions: int
    images: int

    @property
    def ok(self) -> bool:
        return self.rel_err <= EXPORT_RTOL and self.mismatched_predictions == 0


@dataclasses.dataclass(frozen=True)
class ExportTarget:
    """Where and in which key names a run's export goes."""

    layout: str
    hub_dir: bool  # a model-hub directory rather than a file

    def path(self, run_dir: Path) -> Path:
        return run_dir / (EXPORT_DIR if self.hub_dir else EXPORT_FILE)


def export_target(config: TrainConfig, source: SourceRecord | None) -> ExportTarget:
    """--export-layout, else the source weights' layout, else the seed's; a directory for transformers, and for
    timm when the source was a timm directory (TrainConfig has checked that the layout's model can be this network)."""
    layout = config.export_layout or (source.layout if source is not None else SEED)
    hub_dir = layout == TRANSFORMERS or (layout == TIMM and source is not None and source.hub_dir)
    return ExportTarget(layout, hub_dir)


def _labelled(config: dict[str, Any], layout: str, class_names: Sequence[str]) -> dict[str, Any]:
    """A hub config.json naming the classes: transformers' id2label/label2id, timm's label_names."""
    if layout == TRANSFORMERS:
        return {
            **config,
            "id2label": {str(i): name for i, name in enumerate(class_names)},
            "label2id": {name: i for i, name in enumerate(class_names)},
        }
    return {**config, "label_names": list(class_names)}


def image_processor_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """transformers' preprocessor_config.json for the run's evaluation transform: resize the shorter side to
    ``resize``, cut the centre ``image_size`` square, scale to [0, 1], normalise by the run's mean and std."""
    return {
        "image_processor_type": IMAGE_PROCESSOR,
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": metadata["resize"]},
        "resample": RESAMPLE_CODE,
        "do_center_crop": True,
        "crop_size": {"height": metadata["image_size"], "width": metadata["image_size"]},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(metadata["mean"]),
        "image_std": list(metadata["std"]),
    }


def _write_hub_dir(
    path: Path,
    state_dict: Any,
    configs: dict[str, dict[str, Any]],
    metadata: dict[str, str],
    check: Callable[[Path], None],
) -> None:
    """Write a model-hub directory (the weights and ``configs``, file name -> JSON object) beside ``path``, check
    it, then rename it into place (replacing ``path``): a directory that fails the check never reaches ``path``."""
    import parity

    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        temporary.mkdir()
        parity.write_checkpoint(temporary / EXPORT_FILE, state_dict, "torch", metadata)
        for name, config in configs.items():
            (temporary / name).write_text(json.dumps(config, indent=2))
        check(temporary)
        if path.exists():
            old = path.with_name(f".{path.name}.{secrets.token_hex(8)}.old")
            path.rename(old)
            shutil.rmtree(old)
        temporary.rename(path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def export_torch(
    variables: dict[str, Any],
    path: str | Path,
    metadata: dict[str, Any],
    check: Callable[[Path], None] | None = None,
    target: ExportTarget = ExportTarget(SEED, False),
) -> Path:
    """Write the state dict in ``target``'s layout as safetensors (atomically, with a checksum), or as a model-hub
    directory (a transformers one with its image processor's settings); metadata as JSON strings.

    ``check`` gets the written file (or directory) under its temporary name; if it raises, ``path`` is never
    written.
    """
    import parity
    from parity.conversion.convert import check_flax_variables

    weights = check_flax_variables(jax.device_get(variables))
    state_dict = weights.to_torch(target.layout)
    header = {**TORCH_FORMAT, **{k: json.dumps(v) for k, v in metadata.items()}}
    if target.hub_dir:
        hub_config = weights.spec.hub_config(target.layout) or {}
        configs = {HUB_CONFIG_FILE: _labelled(hub_config, target.layout, metadata["class_names"])}
        if target.layout == TRANSFORMERS:
            configs[PREPROCESSOR_FILE] = image_processor_config(metadata)
        _write_hub_dir(Path(path), state_dict, configs, header, check or (lambda written: None))
    else:
        parity.write_checkpoint(path, state_dict, "torch", header, check)
    return Path(path)


def verify_export(
    path: str | Path,
    forward: Callable[[dict[str, Any], jax.Array], jax.Array],
    variables: dict[str, Any],
    images_nhwc_u8: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    cancelled: Callable[[], bool] | None = None,
) -> ExportCheck:
    """Run resnet_torch (CPU, fp32) from the file and the Flax model (``forward``: variables and normalised
    images -> eval logits) on the same images; compare logits.

    ``cancelled`` is asked before each batch; when it says so, ExportCancelled is raised.
    """
    import torch

    import parity

    torch_model = parity.load_checkpoint(path, "torch")
    apply = jax.jit(lambda v, x: forward(v, normalize(x, mean, std)))
    flax_logits, torch_logits = [], []
    for start in range(0, len(images_nhwc_u8), VERIFY_CHUNK):
        if cancelled is not None and cancelled():
            raise ExportCancelled(f"{path}: the export check was interrupted")
        batch = images_nhwc_u8[start : start + VERIFY_CHUNK]
        flax_logits.append(np.asarray(apply(variables, jnp.asarray(batch)), np.float64))
        x_nchw = torch.from_numpy(np.array(normalize(jnp.asarray(batch), mean, std))).permute(0, 3, 1, 2)
        with torch.no_grad():
            torch_logits.append(torch_model(x_nchw.contiguous()).double().numpy())
    a, b = np.concatenate(flax_logits), np.concatenate(torch_logits)
    rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    mismatched = int(np.sum(np.argmax(a, -1) != np.argmax(b, -1)))
    return ExportCheck(rel, mismatched, len(a))


def eval_resize(config: TrainConfig) -> int:
    """The shorter side an image is resized to before the centre crop in evaluation: an image folder's is
    torchvision's (256 for 224); in-memory datasets' images are used whole, at the image size."""
    return config.image_size if config.dataset in IN_MEMORY else eval_resize_side(config.image_size)


def export_run(
    config: TrainConfig,
    state: TrainStateLike,
    ds: Feed,
    run_dir: Path,
    stop: StopRequest,
    source: SourceRecord | None = None,
) -> dict[str, Any]:
    """Write the run's PyTorch checkpoint (in the layout ``export_target`` picks), verified on the test set
    against the float32 Flax model before it is in place; returns the summary's export keys.

    A file that fails the check, or whose check a stop signal interrupts, never reaches its path.
    """
    variables = jax.device_get(state.variables())
    target = export_target(config, source)
    meta = {
        "arch": config.arch,
        "small_stem": config.small_stem,
        "layout": target.layout,
        "image_size": config.image_size,
        "resize": eval_resize(config),
        "mean": list(ds.mean),
        "std": list(ds.std),
        "input": "NCHW RGB, x / 255 normalised by mean/std; images resized (shorter side) and centre-cropped",
        "class_names": list(ds.class_names),
    }
    path = target.path(run_dir)
    # Verify the float32 weights at full precision (no TF32 on GPUs), whatever dtype trained them.
    forward = step_functions(config.api).eval_forward(config, ds.num_classes, jnp.float32, jax.lax.Precision.HIGHEST)
    checks: list[ExportCheck] = []

    def verify(written: Path) -> None:
        check = verify_export(
            written, forward, variables, ds.test_images, ds.mean, ds.std, lambda: stop.signal_name is not None
        )
        if not check.ok:
            raise ExportMismatchError(
                f"export check failed: resnet_torch with the exported weights differs from the Flax model on the test "
                f"set (relative logit error {check.rel_err:.2e}, tolerance {EXPORT_RTOL:.0e}; "
                f"{check.mismatched_predictions} of {check.images} predictions differ); {path} was not written"
            )
        checks.append(check)

    try:
        export_torch(variables, path, meta, verify, target)
    except ExportCancelled:
        log.warning("%s: export check interrupted by %s; the file was not written", path, stop.signal_name)
        return {"export": None}
    [check] = checks
    return {
        "export": str(path),
        "export_rel_err": check.rel_err,
        "export_mismatched_predictions": check.mismatched_predictions,
    }
