"""The naming rule between the seed's torch keys, torchvision's keys and Flax variable paths.

Seed key ``conv2_x.0.residual_function.3.weight`` is Flax path
``('conv2_x', '0', 'residual_function', '3', 'kernel')``: the module path is the same, and each
leaf kind has one name and one transform on either side (``parity.convert``). torchvision's
names differ only by module, and by a rule that holds at every depth.
"""

from __future__ import annotations

import re

SEED = "seed"
TORCHVISION = "torchvision"
LAYOUTS = (SEED, TORCHVISION)

# torchvision block layer -> index in the seed's residual_function Sequential (relus take a slot).
_TV_CONV_TO_SEED = {"conv1": "0", "bn1": "1", "conv2": "3", "bn2": "4", "conv3": "6", "bn3": "7"}
_SEED_TO_TV_CONV = {v: k for k, v in _TV_CONV_TO_SEED.items()}

_TV_STEM = re.compile(r"^(conv1|bn1)\.(\w+)$")
_TV_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(conv[123]|bn[123])\.(\w+)$")
_TV_DOWNSAMPLE = re.compile(r"^layer([1-4])\.(\d+)\.downsample\.([01])\.(\w+)$")
_SEED_STEM = re.compile(r"^conv1\.([01])\.(\w+)$")
_SEED_BLOCK = re.compile(r"^conv([2-5])_x\.(\d+)\.residual_function\.(\d)\.(\w+)$")
_SEED_SHORTCUT = re.compile(r"^conv([2-5])_x\.(\d+)\.shortcut\.([01])\.(\w+)$")


def detect_layout(keys: list[str]) -> str:
    """'torchvision' when the keys use torchvision's module names (layer1.., bn1, downsample), else 'seed'."""
    if any(k.startswith(("layer1.", "bn1.")) for k in keys):
        return TORCHVISION
    return SEED


def torchvision_to_seed(key: str) -> str:
    """Rename one torchvision key to the seed's; keys that match no rule come back unchanged."""
    if m := _TV_STEM.match(key):
        return f"conv1.{'0' if m[1] == 'conv1' else '1'}.{m[2]}"
    if m := _TV_BLOCK.match(key):
        return f"conv{int(m[1]) + 1}_x.{m[2]}.residual_function.{_TV_CONV_TO_SEED[m[3]]}.{m[4]}"
    if m := _TV_DOWNSAMPLE.match(key):
        return f"conv{int(m[1]) + 1}_x.{m[2]}.shortcut.{m[3]}.{m[4]}"
    return key


def seed_to_torchvision(key: str) -> str:
    """Rename one seed key to torchvision's; keys that match no rule come back unchanged."""
    if m := _SEED_STEM.match(key):
        return f"{'conv1' if m[1] == '0' else 'bn1'}.{m[2]}"
    if (m := _SEED_BLOCK.match(key)) and m[3] in _SEED_TO_TV_CONV:
        return f"layer{int(m[1]) - 1}.{m[2]}.{_SEED_TO_TV_CONV[m[3]]}.{m[4]}"
    if m := _SEED_SHORTCUT.match(key):
        return f"layer{int(m[1]) - 1}.{m[2]}.downsample.{m[3]}.{m[4]}"
    return key
