"""From a checkpoint file to a working model of either framework, in one call."""

from __future__ import annotations

import os
from typing import Any

import torch

from resnet_arch import HEAD

from .convert import ConversionError, check_flax_variables, check_state_dict, flax_to_torch, torch_to_flax
from .files import FLAX, FRAMEWORKS, NNX, TORCH, read_checkpoint


def load_checkpoint(path: str | os.PathLike, framework: str, **model_kwargs: Any) -> Any:
    """A checkpoint file (.safetensors, .pth/.pt, .msgpack; either framework's weights) -> a model.

    ``framework="torch"``: a resnet_torch.ResNet in eval mode holding the file's tensors, dtype kept.
    ``framework="flax"``: ``(resnet_flax.ResNet, variables)``, ready for ``model.apply(variables, x_nhwc)``;
    the model's ``param_dtype`` is the checkpoint's. ``framework="nnx"``: a resnet_flax.nnx.ResNet in eval
    mode holding the weights (built abstractly, then filled), ``param_dtype`` the checkpoint's.
    The architecture is read from the file; ``model_kwargs`` go to the model (e.g. ``dtype``,
    ``precision`` for Flax). Errors name the file.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
    ckpt = read_checkpoint(path)
    try:
        if framework == TORCH:
            sd = flax_to_torch(ckpt.tensors) if ckpt.framework == FLAX else ckpt.tensors
            spec, sd = check_state_dict(sd)
            with torch.device("meta"):
                model = spec.torch_model(**model_kwargs)
            # assign=True adopts the tensors (and their dtype) instead of copying into a fresh init.
            model.load_state_dict(sd, strict=True, assign=True)
            return model.eval()
        if ckpt.framework == TORCH:
            spec, sd = check_state_dict(ckpt.tensors)
            variables = torch_to_flax(sd)
        else:
            spec, variables = check_flax_variables(ckpt.tensors)
        if framework == NNX:
            from .nnx import linen_to_nnx  # flax.nnx only when asked for

            return linen_to_nnx(variables, **model_kwargs)
        param_dtype = variables["params"][HEAD]["kernel"].dtype
        return spec.flax_model(**{"param_dtype": param_dtype, **model_kwargs}), variables
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from None
