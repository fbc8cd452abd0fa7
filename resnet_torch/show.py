"""A torch ResNet shown the seed tutorial's three ways (docs/design.md): layer table, modules, named parameters."""

from __future__ import annotations

from torch import nn

from resnet_arch import IN_CHANNELS

# The seed's summary(model, (3, 224, 224)).
DEFAULT_INPUT_HW = (224, 224)
# Table rows down to the blocks (conv2_x.0), the depth resnet_flax.show's table uses too.
TABLE_DEPTH = 2
ROOT_NAME = "(model)"


def layer_table(model: nn.Module, input_hw: tuple[int, int] = DEFAULT_INPUT_HW, depth: int = TABLE_DEPTH) -> str:
    """torchinfo's table for one NCHW image: each layer's output shape and parameter count.

    The forward runs on the model's own device; a model built under ``torch.device("meta")``
    gives the shapes and counts without computing anything.
    """
    # Imported here: only the table needs torchinfo, and `resnet-parity` must start without it.
    import torchinfo

    device = next(model.parameters()).device
    stats = torchinfo.summary(
        model,
        input_size=(1, IN_CHANNELS, *input_hw),
        col_names=("output_size", "num_params"),
        depth=depth,
        row_settings=("var_names",),
        device=device,
        verbose=0,
    )
    return str(stats)


def module_list(model: nn.Module) -> str:
    """Every module from ``named_modules()``, one line each: dotted name, class and settings."""
    rows = [(name or ROOT_NAME, f"{type(m).__name__}({m.extra_repr()})") for name, m in model.named_modules()]
    return _columns(rows)


def parameter_list(model: nn.Module) -> str:
    """Every tensor from ``named_parameters()`` with its shape, and the total count."""
    params = list(model.named_parameters())
    rows = [(name, str(list(p.shape))) for name, p in params]
    total = sum(p.numel() for _, p in params)
    return f"{_columns(rows)}\nTotal params: {total:,} in {len(params)} tensors"


def _columns(rows: list[tuple[str, str]]) -> str:
    """Two left-aligned columns."""
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a.ljust(width)}  {b}" for a, b in rows)
