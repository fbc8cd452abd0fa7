"""Weights between resnet_torch and resnet_flax, and the checks that prove both compute the same."""

from .arch import ArchSpec, infer_arch
from .convert import ConversionError, arch_of, flax_to_torch, torch_to_flax
from .files import CheckpointError, read_checkpoint, write_checkpoint
from .load import load_checkpoint

__all__ = [
    "ArchSpec",
    "CheckpointError",
    "ConversionError",
    "arch_of",
    "flax_to_torch",
    "infer_arch",
    "load_checkpoint",
    "read_checkpoint",
    "torch_to_flax",
    "write_checkpoint",
]
