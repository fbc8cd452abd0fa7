"""Trained Flax weights -> a PyTorch safetensors checkpoint, verified against resnet_torch.

torch and parity's torch-using modules are imported only when an export is written, so a run
without one (``--no-export``) needs no torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_flax.preprocess import normalize

from .api import TrainStateLike, step_functions
from .config import TrainConfig
from .feeds import Feed
from .signals import StopRequest

log = logging.getLogger(__name__)

EXPORT_FILE = "model.safetensors"

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


def export_torch(
    variables: dict[str, Any], path: str | Path, metadata: dict[str, Any], check: Callable[[Path], None] | None = None
) -> Path:
    """Write the seed-layout state dict as safetensors (atomically, with a checksum); metadata as JSON strings.

    ``check`` gets the written file under its temporary name; if it raises, ``path`` is never written.
    """
    import parity

    state_dict = parity.flax_to_torch(jax.device_get(variables), layout="seed")
    parity.write_checkpoint(path, state_dict, "torch", {k: json.dumps(v) for k, v in metadata.items()}, check)
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


def export_run(
    config: TrainConfig, state: TrainStateLike, ds: Feed, run_dir: Path, stop: StopRequest
) -> dict[str, Any]:
    """Write the run's PyTorch checkpoint, verified on the test set against the float32 Flax model before it is in
    place; returns the summary's export keys.

    A file that fails the check, or whose check a stop signal interrupts, never reaches its path.
    """
    variables = jax.device_get(state.variables())
    meta = {
        "arch": config.arch,
        "small_stem": config.small_stem,
        "image_size": config.image_size,
        "mean": list(ds.mean),
        "std": list(ds.std),
        "input": "NCHW RGB, x / 255 normalised by mean/std",
        "class_names": list(ds.class_names),
    }
    path = run_dir / EXPORT_FILE
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
        export_torch(variables, path, meta, verify)
    except ExportCancelled:
        log.warning("%s: export check interrupted by %s; the file was not written", path, stop.signal_name)
        return {"export": None}
    [check] = checks
    return {
        "export": str(path),
        "export_rel_err": check.rel_err,
        "export_mismatched_predictions": check.mismatched_predictions,
    }
