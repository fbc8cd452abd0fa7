"""Weights between resnet_torch and resnet_flax, and the checks that prove both compute the same."""

from .arch import ArchSpec, infer_arch
from .convert import ConversionError, arch_of, flax_to_torch, torch_to_flax

__all__ = ["ArchSpec", "ConversionError", "arch_of", "flax_to_torch", "infer_arch", "torch_to_flax"]
