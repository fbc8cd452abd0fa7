"""resnet-parity predict MODEL IMAGE...: the top-k classes of each image, by name, with their probabilities.

MODEL is a resnet-train run directory (its export), an exported file or a model-hub directory. Images go
through the evaluation transform recorded with the model: the shorter side resized, the centre cut, x / 255
normalised by the recorded mean and std. resnet-train records it in the export's metadata; a hub directory
from elsewhere has it in transformers' preprocessor_config.json or timm's pretrained_cfg.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resnet_data.transforms import RESAMPLE

from ..conversion.exports import HUB_CONFIG_FILE, HUB_WEIGHTS_FILE, export_of, hub_class_names
from ..conversion.files import FRAMEWORKS, CheckpointError
from ..conversion.validate import ConversionError
from .args import EXIT_BAD_INPUT, framework_arg, positive_int

HF_PREPROCESSOR = "preprocessor_config.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BATCH = 32  # images per forward pass (memory only)
DEFAULT_TOP_K = 5


class PredictError(ValueError):
    """An input predict cannot use (a model without class names or transform, a file that is no image)."""


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The evaluation transform: resize the shorter side to ``resize`` with the PIL filter ``resample`` (an
    ``Image.Resampling`` code; bilinear, torchvision's default, unless the model records another), cut the
    centre ``size`` square, x / 255, then (x - mean) / std."""

    size: int
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resample: int = int(RESAMPLE)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What predict knows of a model besides its weights."""

    weights: Path  # the file or hub directory the weights are read from
    class_names: tuple[str, ...] | None
    preprocessing: Preprocessing | None


def _safetensors_metadata(path: Path) -> dict[str, Any]:
    """A safetensors file's metadata, each JSON value decoded (others kept as text)."""
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    import safetensors

    with safetensors.safe_open(str(path), "np") as f:
        raw = f.metadata() or {}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _json_file(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise PredictError(f"{path}: not a readable JSON file: {e}") from None
    return loaded if isinstance(loaded, dict) else {}


def _recorded(meta: Mapping[str, Any]) -> Preprocessing | None:
    """resnet-train's metadata: image_size, resize (else torchvision's 8/7 of the size), mean, std."""
    from resnet_data.transforms import eval_resize_side

    if not all(isinstance(meta.get(k), (int, list)) for k in ("image_size", "mean", "std")):
        return None
    size = int(meta["image_size"])
    resize = int(meta["resize"]) if isinstance(meta.get("resize"), int) else eval_resize_side(size)
    return Preprocessing(size, resize, tuple(meta["mean"]), tuple(meta["std"]))


def _hub_preprocessing(folder: Path, config: Mapping[str, Any]) -> Preprocessing | None:
    """transformers' preprocessor_config.json (shortest_edge and crop_pct, ConvNextImageProcessor's; or
    shortest_edge and crop_size, BitImageProcessor's; resample) or timm's pretrained_cfg (input_size, crop_pct,
    interpolation)."""
    hf = _json_file(folder / HF_PREPROCESSOR)
    edge = hf.get("size", {}).get("shortest_edge") if isinstance(hf.get("size"), dict) else None
    if isinstance(edge, int) and "image_mean" in hf and "image_std" in hf:
        crop = hf.get("crop_size", {}).get("height") if isinstance(hf.get("crop_size"), dict) else None
        resample = hf["resample"] if isinstance(hf.get("resample"), int) else int(RESAMPLE)
        if isinstance(crop, int):  # resize the shorter side to the edge, then cut the crop
            return Preprocessing(crop, edge, tuple(hf["image_mean"]), tuple(hf["image_std"]), resample)
        resize = int(edge / hf["crop_pct"]) if hf.get("crop_pct") else edge
        return Preprocessing(edge, resize, tuple(hf["image_mean"]), tuple(hf["image_std"]), resample)
    timm = config.get("pretrained_cfg")
    if isinstance(timm, Mapping) and {"input_size", "mean", "std"} <= set(timm):
        size = int(timm["input_size"][-1])
        resize = int(size / timm.get("crop_pct", 1.0))
        return Preprocessing(
            size, resize, tuple(timm["mean"]), tuple(timm["std"]), _pil_filter(timm.get("interpolation"))
        )
    return None


def _pil_filter(name: object) -> int:
    """A filter named as timm names them ('bilinear', 'bicubic', ...) as its PIL code; bilinear's for another."""
    from PIL import Image

    if not isinstance(name, str) or name.upper() not in Image.Resampling.__members__:
        return int(RESAMPLE)
    return int(Image.Resampling[name.upper()])


def model_info(model: Path) -> ModelInfo:
    """Where MODEL's weights are, and the class names and transform recorded with them (None where none are)."""
    weights = export_of(model)
    if weights.is_dir():
        meta = _safetensors_metadata(weights / HUB_WEIGHTS_FILE)
        config = _json_file(weights / HUB_CONFIG_FILE)
        names = meta.get("class_names") or hub_class_names(config)
        preprocessing = _recorded(meta) or _hub_preprocessing(weights, config)
    else:
        meta = _safetensors_metadata(weights)
        names, preprocessing = meta.get("class_names"), _recorded(meta)
    return ModelInfo(weights, tuple(map(str, names)) if names else None, preprocessing)


def image_files(inputs: Sequence[Path]) -> list[Path]:
    """The image files named, a folder standing for every image file under it (sorted); PredictError for a
    folder without any or a path that does not exist."""
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
            )
            if not found:
                raise PredictError(f"{path}: a folder with no image files ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise PredictError(f"{path}: no such file or folder")
    return files


def load_image(path: Path, pre: Preprocessing) -> np.ndarray:
    """One image through the evaluation transform, as a float32 HWC array."""
    from resnet_data.images import DECODE_ERRORS, read_rgb
    from resnet_data.transforms import center_crop, resize_shorter

    try:
        image = read_rgb(path)
    except DECODE_ERRORS as e:
        raise PredictError(f"{e}: not an image this can read") from None
    resized = resize_shorter(image, pre.resize, pre.resample)
    pixels = np.asarray(center_crop(resized, pre.size), np.float32) / 255.0
    return ((pixels - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)).astype(np.float32)


def logits_fn(weights: Path, framework: str) -> Callable[[np.ndarray], np.ndarray]:
    """NHWC normalised images -> float64 logits, by the framework asked for (float32 weights and compute)."""
    import jax
    import jax.numpy as jnp

    from ..conversion.load import load_checkpoint

    if framework == "torch":
        import torch

        model = load_checkpoint(weights, "torch", param_dtype=torch.float32)

        def run_torch(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).double().numpy()

        return run_torch
    if framework == "nnx":
        nnx_model = load_checkpoint(weights, "nnx", param_dtype=jnp.float32, dtype=jnp.float32)
        return lambda x: np.asarray(nnx_model(jnp.asarray(x)), np.float64)
    module, variables = load_checkpoint(weights, "linen", param_dtype=jnp.float32, dtype=jnp.float32)
    apply = jax.jit(lambda v, x: module.apply(v, x, train=False))
    return lambda x: np.asarray(apply(variables, jnp.asarray(x)), np.float64)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def predict(model: Path, images: Sequence[Path], framework: str, top_k: int) -> list[dict[str, Any]]:
    """Per image: its path and the top-k classes ({"class", "index", "probability"}), most probable first."""
    info = model_info(model)
    if info.class_names is None:
        raise PredictError(
            f"{model}: records no class names (resnet-train's export carries them; a hub directory's config.json "
            "has id2label or label_names)"
        )
    if info.preprocessing is None:
        raise PredictError(
            f"{model}: records no evaluation transform (image size, mean and std: resnet-train's export metadata, "
            f"transformers' {HF_PREPROCESSOR} or timm's pretrained_cfg)"
        )
    files = image_files(images)
    pre = info.preprocessing
    arrays = np.stack([load_image(path, pre) for path in files])  # every image read before any is predicted
    forward = logits_fn(info.weights, framework)
    probabilities = np.concatenate([softmax(forward(arrays[i : i + BATCH])) for i in range(0, len(arrays), BATCH)])
    if probabilities.shape[-1] != len(info.class_names):
        raise PredictError(f"{model}: {len(info.class_names)} class names for a {probabilities.shape[-1]}-class head")
    out = []
    for path, p in zip(files, probabilities, strict=True):
        best = np.argsort(-p, kind="stable")[:top_k]
        top = [{"class": info.class_names[i], "index": int(i), "probability": float(p[i])} for i in best]
        out.append({"image": str(path), "top_k": top})
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``predict`` and its options."""
    p = sub.add_parser(
        "predict",
        help="the top-k classes of images, by name, with their probabilities",
        description="Classify images with a resnet-train run, an exported file or a model-hub directory, through "
        "the evaluation transform recorded with the model (shorter side resized, centre crop, normalisation). "
        "Every framework gives the same answer.",
    )
    p.add_argument("model", type=Path, help="resnet-train run directory, exported file or model-hub directory")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="image files, or folders of them")
    p.add_argument("--top-k", type=positive_int, default=DEFAULT_TOP_K, help=f"classes per image ({DEFAULT_TOP_K})")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.add_argument(
        "--framework", type=framework_arg, choices=FRAMEWORKS, default="torch", help="the engine (flax: linen)"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Predict and print; returns the exit code."""
    try:
        results = predict(args.model, args.images, args.framework, args.top_k)
    except (PredictError, CheckpointError, ConversionError, OSError) as e:
        print(f"resnet-parity predict: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps({"model": str(args.model), "framework": args.framework, "predictions": results}))
        return 0
    for result in results:
        print(result["image"])
        width = max(len(t["class"]) for t in result["top_k"])
        for rank, t in enumerate(result["top_k"], 1):
            print(f"  {rank}. {t['class']:<{width}}  {t['probability']:.4f}")
    return 0
