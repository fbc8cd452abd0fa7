"""From a checkpoint file or model-hub directory to a working model of either framework, in one call."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from resnet_arch import HEAD, NNX

from .convert import check_flax_variables, check_state_dict
from .files import TORCH, framework_name, read_checkpoint
from .hub import read_hub_dir
from .rules import PARAMS
from .validate import ERROR, ConversionError, builder_options
from .weights import Weights


def read_weights(path: str | os.PathLike, *, bad_values: str = ERROR, stacklevel: int = 1) -> Weights:
    """A checkpoint file or hub directory, read and checked once (a directory's config.json included).

    Errors name the file or directory.
    """
    path = Path(path)
    ckpt, config = read_hub_dir(path) if path.is_dir() else (read_checkpoint(path), {})
    try:
        if ckpt.framework == TORCH:
            return check_state_dict(ckpt.tensors, config=config, bad_values=bad_values, stacklevel=stacklevel + 1)
        return check_flax_variables(ckpt.tensors, bad_values=bad_values, stacklevel=stacklevel + 1)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from None


def load_checkpoint(
    path: str | os.PathLike,
    framework: str,
    *,
    param_dtype: Any = None,
    bad_values: str = ERROR,
    **model_kwargs: Any,
) -> Any:
    """A checkpoint (.safetensors, .pth/.pt/.bin, .msgpack; or a hub directory) of either framework -> a model.

    ``framework="torch"``: a resnet_torch.ResNet in eval mode holding the file's tensors.
    ``framework="linen"`` (or ``"flax"``): ``(resnet_flax.ResNet, variables)``, ready for
    ``model.apply(variables, x_nhwc)``. ``framework="nnx"``: a resnet_flax.nnx.ResNet in eval mode
    holding the weights (built abstractly, then filled). The weights keep the checkpoint's dtypes
    unless ``param_dtype`` casts the floating-point ones; a Flax model's ``param_dtype`` is theirs. A
    directory is what transformers' ``save_pretrained`` or timm's ``save_for_hf`` leaves
    (``model.safetensors`` or ``pytorch_model.bin``, and ``config.json``). The architecture is read
    from the weights (and checked against the config); ``model_kwargs`` go to the model (e.g.
    ``dtype``, the computation dtype, and ``precision`` for Flax); ``num_classes`` or ``small_stem``
    among them must be the weights' own. ``bad_values`` as in ``torch_to_flax``. Errors name the file.
    """
    framework = framework_name(framework)
    weights = read_weights(path, bad_values=bad_values, stacklevel=2)
    try:
        model_kwargs = builder_options(weights.spec, model_kwargs)
        if framework == TORCH:
            with torch.device("meta"):
                model = weights.spec.torch_model(**model_kwargs)
            # assign=True adopts the tensors (and their dtype) instead of copying into a fresh init.
            model.load_state_dict(weights.to_torch(param_dtype=param_dtype), strict=True, assign=True)
            return model.eval()
        if framework == NNX:
            from .nnx import weights_to_nnx  # flax.nnx only when asked for

            return weights_to_nnx(weights, param_dtype=param_dtype, **model_kwargs)
        variables = weights.to_flax(param_dtype)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from None
    model_dtype = variables[PARAMS][HEAD]["kernel"].dtype
    return weights.spec.flax_model(**model_kwargs, param_dtype=model_dtype), variables
