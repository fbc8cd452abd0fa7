"""Serving artifacts: a converted or trained ResNet as ONNX or as a serialized JAX program, verified on write.

``stablehlo``: ``jax.export`` of the eval-mode linen model with every BatchNorm folded into its
convolution, lowered for CPU and CUDA, batch dimension symbolic; ``jax.export.deserialize`` reads it
back without this project. Its input is NHWC, as the Flax model takes it. A JSON beside it
(``OUT.json``) records the class names, the input and its normalisation.

``onnx``: ``torch.onnx.export`` (the torch.export-based exporter) of the same weights in resnet_torch;
its optimizer folds BatchNorm into the convolutions, so the graph is Conv, Relu, Add, MaxPool, a
global average and Gemm, with a dynamic batch dimension and NCHW float32 input, as PyTorch users
expect. The class names and the normalisation are in the model's metadata.

Both take images as ``x / 255`` normalised by the recorded mean and std. Before an artifact reaches
its path it is run on a fixed random batch and its logits compared with the float32 Flax model's;
a mismatch leaves nothing behind (``ExportMismatchError``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors

import resnet_flax
from resnet_arch import HEAD, LINEN
from resnet_data.transforms import IMAGENET_MEAN, IMAGENET_STD
from resnet_flax.fold import fold

from .conversion.atomic import atomic_write
from .conversion.exports import HUB_CONFIG_FILE, HUB_WEIGHTS_FILE, export_of, hub_class_names
from .conversion.files import CheckpointError
from .conversion.load import load_checkpoint

ONNX, STABLEHLO = "onnx", "stablehlo"
FORMATS = (ONNX, STABLEHLO)
# The artifact's dtype: its weights and its computation; input and logits stay float32.
FP32, FP16, BF16 = "fp32", "fp16", "bf16"
JAX_DTYPES = {FP32: jnp.float32, FP16: jnp.float16, BF16: jnp.bfloat16}
# onnxruntime's CPU provider has no bfloat16 convolution, so an ONNX file is float32 or float16.
FORMAT_DTYPES = {ONNX: (FP32, FP16), STABLEHLO: (FP32, FP16, BF16)}
# Relative logit error an artifact may have against the float32 Flax model: float32 is the eval-logit
# tolerance of the parity checks (docs/design.md, "Tolerances"); the half-precision rows allow their
# 8 (bf16) and 11 (fp16) bits of mantissa through about 50 layers.
TOLERANCES = {FP32: 1e-5, FP16: 1e-2, BF16: 3e-2}
# The verification batch: a fixed seed, and a size no caller is likely to export with, so the dynamic
# batch dimension is exercised.
VERIFY_BATCH, VERIFY_SEED = 3, 0
DEFAULT_IMAGE_SIZE = 224
INPUT_NAME, OUTPUT_NAME = "images", "logits"
NORMALISATION = "x / 255, then (x - mean) / std per RGB channel"


class ExportError(ValueError):
    """An export that cannot be made as asked (an unknown format, a dtype the format lacks); nothing was written."""


class ExportMismatchError(ExportError):
    """The exported artifact's logits differ from the Flax model's beyond the tolerance; nothing was written."""


@dataclasses.dataclass(frozen=True)
class Serving:
    """What a served model needs besides its weights: class names, input size and normalisation."""

    class_names: tuple[str, ...]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def metadata(self, layout: str) -> dict[str, Any]:
        """The facts recorded with an artifact whose input has ``layout`` (NCHW or NHWC)."""
        return {
            "class_names": list(self.class_names),
            "input": {"name": INPUT_NAME, "layout": layout, "dtype": "float32", "image_size": self.image_size},
            "normalisation": NORMALISATION,
            "mean": list(self.mean),
            "std": list(self.std),
        }


@dataclasses.dataclass(frozen=True)
class Exported:
    """What ``export`` wrote: the artifact, its metadata file (StableHLO only) and the verification."""

    path: Path
    metadata_path: Path | None
    rel_err: float
    tolerance: float
    size: int


def _check_writable(out: Path) -> None:
    """Refuse an output whose folder is missing or read-only before any work is done."""
    folder = out.parent
    if not folder.is_dir():
        raise OSError(f"{out}: cannot write there: {folder} is not an existing folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OSError(f"{out}: cannot write there: {folder} is not writable")
    if out.is_dir():
        raise OSError(f"{out}: is a folder; give a file name ending in .onnx or .stablehlo")


def _json_list(metadata: Mapping[str, str], key: str) -> list[Any] | None:
    try:
        value = json.loads(metadata[key]) if key in metadata else None
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) else None


def serving_of(model: Path, weights_path: Path, num_classes: int, image_size: int | None) -> Serving:
    """Class names and normalisation from the file's metadata (resnet-train writes them) or a hub config;
    otherwise class indices and the ImageNet statistics."""
    metadata: Mapping[str, str] = {}
    # A hub directory's weights file holds the metadata.
    metadata_file = weights_path / HUB_WEIGHTS_FILE if weights_path.is_dir() else weights_path
    if metadata_file.suffix == ".safetensors" and metadata_file.is_file():
        with safetensors.safe_open(str(metadata_file), "np") as f:
            metadata = f.metadata() or {}
    names: Sequence[Any] | None = _json_list(metadata, "class_names")
    if names is None and weights_path.is_dir():  # a hub directory: its config names classes
        names = hub_class_names(json.loads((weights_path / HUB_CONFIG_FILE).read_text()))
    mean, std = _json_list(metadata, "mean") or IMAGENET_MEAN, _json_list(metadata, "std") or IMAGENET_STD
    saved_size = metadata.get("image_size")
    size = image_size or (int(saved_size) if saved_size and saved_size.isdigit() else DEFAULT_IMAGE_SIZE)
    if names is not None and len(names) != num_classes:
        raise CheckpointError(f"{weights_path}: {len(names)} class names for a {num_classes}-class head")
    classes = tuple(map(str, names)) if names is not None else tuple(str(i) for i in range(num_classes))
    return Serving(classes, size, tuple(map(float, mean)), tuple(map(float, std)))


def _verification_batch(size: int) -> np.ndarray:
    """The fixed NHWC float32 batch every artifact is checked on."""
    return np.random.default_rng(VERIFY_SEED).standard_normal((VERIFY_BATCH, size, size, 3)).astype(np.float32)


def _relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _stablehlo(model: resnet_flax.ResNet, variables: Any, serving: Serving, dtype: str) -> tuple[bytes, Callable]:
    """The serialized program, and how to run a deserialized copy of it on an NHWC batch."""
    compute = JAX_DTYPES[dtype]
    folded_model, folded = fold(model, variables)
    folded_model = folded_model.clone(dtype=compute, param_dtype=compute)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, compute), folded)

    def logits(x_nhwc: jax.Array) -> jax.Array:
        out: jax.Array = folded_model.apply(params, x_nhwc.astype(compute), train=False)  # type: ignore[assignment]
        return out.astype(jnp.float32)

    (batch,) = jax.export.symbolic_shape(INPUT_NAME)
    shape = (batch, serving.image_size, serving.image_size, 3)
    program = jax.export.export(jax.jit(logits), platforms=("cpu", "cuda"))(jax.ShapeDtypeStruct(shape, jnp.float32))

    def run(path: Path, x_nhwc: np.ndarray) -> np.ndarray:
        return np.asarray(jax.export.deserialize(bytearray(path.read_bytes())).call(jnp.asarray(x_nhwc)))

    return bytes(program.serialize()), run


def _onnx(variables: Any, serving: Serving, dtype: str) -> tuple[bytes, Callable]:
    """The ONNX file's bytes, and how to run it with onnxruntime on an NHWC batch (given to it as NCHW)."""
    import onnxruntime
    import torch

    import parity

    torch_model = parity.arch_of(variables).torch_model()
    torch_model.load_state_dict(parity.flax_to_torch(jax.device_get(variables)), strict=True)
    cast = torch.float16 if dtype == FP16 else torch.float32

    class Served(torch.nn.Module):
        """float32 NCHW in, float32 logits out, the network in the export dtype between."""

        def __init__(self) -> None:
            super().__init__()
            self.net = torch_model.to(cast).eval()

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.net(images.to(cast)).float()

    example = torch.zeros(2, 3, serving.image_size, serving.image_size)
    with warnings.catch_warnings():
        # The exporter reports its progress and torch.export's internals as warnings; none concerns the result.
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            Served(),
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
            verbose=False,
        )
    if program is None:  # the torch.export-based exporter always returns its program
        raise RuntimeError("torch.onnx.export returned no ONNX program")
    proto = program.model_proto
    for key, value in serving.metadata("NCHW").items():
        proto.metadata_props.add(key=key, value=json.dumps(value))

    def run(path: Path, x_nhwc: np.ndarray) -> np.ndarray:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {INPUT_NAME: np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))})[0]

    return proto.SerializeToString(), run


def export(
    model: str | os.PathLike, out: str | os.PathLike, fmt: str, *, dtype: str = FP32, image_size: int | None = None
) -> Exported:
    """Write ``model`` (anything ``parity.load_checkpoint`` reads, or a resnet-train run directory) to ``out``
    as ``fmt``, verified against the float32 Flax model before it is in place.

    Raises CheckpointError or ConversionError (naming the file) for a model that cannot be read (OSError for a
    run directory without an export), ExportMismatchError when the artifact's logits are off, OSError naming
    ``out`` when it cannot be written; in each case nothing is left at ``out``.
    """
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if dtype not in FORMAT_DTYPES[fmt]:
        raise ExportError(f"{fmt} takes --dtype {' or '.join(FORMAT_DTYPES[fmt])}, got {dtype!r}")
    model, out = Path(model), Path(out)
    _check_writable(out)
    weights_path = export_of(model)
    flax_model, variables = load_checkpoint(weights_path, LINEN, precision=jax.lax.Precision.HIGHEST)
    # Verified against float32 whatever the checkpoint holds; the BatchNorm counters stay integers.
    variables = jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, variables
    )
    flax_model = flax_model.clone(dtype=jnp.float32, param_dtype=jnp.float32)
    serving = serving_of(model, weights_path, int(variables["params"][HEAD]["kernel"].shape[-1]), image_size)
    x = _verification_batch(serving.image_size)
    reference = np.asarray(flax_model.apply(variables, jnp.asarray(x), train=False))
    data, run = (
        _stablehlo(flax_model, variables, serving, dtype) if fmt == STABLEHLO else _onnx(variables, serving, dtype)
    )
    tolerance = TOLERANCES[dtype]
    errors: list[float] = []

    def verify(written: Path) -> None:
        errors.append(_relative_error(run(written, x), reference))
        if not errors[-1] <= tolerance:
            raise ExportMismatchError(
                f"{out}: the {fmt} artifact's logits differ from the Flax model's (relative error {errors[-1]:.2e}, "
                f"tolerance {tolerance:.0e}); nothing was written"
            )

    size = atomic_write(out, lambda f: f.write(data), verify)
    metadata_path = None
    if fmt == STABLEHLO:
        metadata_path = out.with_name(out.name + ".json")
        facts = {"format": STABLEHLO, "dtype": dtype, "platforms": ["cpu", "cuda"], **serving.metadata("NHWC")}
        try:
            atomic_write(metadata_path, lambda f: f.write(json.dumps(facts, indent=2).encode() + b"\n"))
        except BaseException:
            out.unlink(missing_ok=True)
            raise
    return Exported(out, metadata_path, errors[-1], tolerance, size)


def format_of(out: str | os.PathLike, fmt: str | None) -> str:
    """``fmt`` if given, else the one OUT's suffix names (``.onnx``, ``.stablehlo``)."""
    if fmt is not None:
        return fmt
    suffix = Path(out).suffix.lstrip(".").lower()
    if suffix not in FORMATS:
        raise ExportError(f"{out}: say --format {'|'.join(FORMATS)} (the suffix .{suffix} names none of them)")
    return suffix
