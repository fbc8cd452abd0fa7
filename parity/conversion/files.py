"""Checkpoint files: safetensors (the default), PyTorch ``.pth``/``.pt`` and Flax msgpack.

safetensors holds one flat ``{name: tensor}`` dict, so the two frameworks use two key schemes:

- torch side: the state-dict keys as they are (``conv1.0.weight`` or torchvision's ``conv1.weight``);
- Flax side: the variable path joined with ``/`` (``params/conv1/0/kernel``,
  ``batch_stats/conv1/1/mean``), arrays in Flax layout (HWIO kernels).

Every file written here carries a ``sha256`` over every tensor's name, dtype, shape and bytes,
checked when the file is read back, so a flipped bit is an error rather than a silently different
weight: in the safetensors header metadata (with ``framework``, "torch" or "linen", and our format
marker ``_resnet_parity``), in a ``.pth`` state dict's ``_metadata`` (which
``load_state_dict(strict=True)`` reads only by module name, so other loaders see a plain state
dict), in a ``.msgpack`` tree as one extra entry (32 uint8 bytes, which
``flax.serialization.from_bytes`` ignores). A file with any of our metadata keys is ours, and one
of ours whose digest is missing or malformed is corrupted; a file without any of them (written by
another tool) loads with a one-line notice that it cannot be verified. Torch pickles are read with
``torch.load(weights_only=True)`` only, never retried unsafely. Writes go through ``atomic_write``.

Framework names: ``torch``, ``linen`` (resnet_flax) and ``nnx`` (resnet_flax.nnx). Both Flax APIs
hold the same variables tree, so a Flax file records ``linen`` and either API reads it; an NNX
model is written as that tree. Wherever a framework name comes in (an argument, the command line,
a file's metadata), ``flax``, the linen API's other name, is read as ``linen``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pickle
import re
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import numpy as np
import safetensors.torch
import torch
from flax import traverse_util

from resnet_arch import LINEN, NNX

from .arrays import torch_to_numpy, torch_views
from .atomic import arrays_digest, atomic_write
from .rules import COLLECTIONS

TORCH = "torch"
FRAMEWORKS = (TORCH, LINEN, NNX)
# An NNX model's state is the linen variables tree: it is written as a linen file, which either API reads.
FILE_FRAMEWORKS = (TORCH, LINEN)  # what a file's header records
# Another name a framework goes by where one comes in: the linen API is also called "flax".
FRAMEWORK_ALIASES = {"flax": LINEN}
SAFETENSORS, PICKLE, MSGPACK = "safetensors", "pickle", "msgpack"
SUFFIXES = {".safetensors": SAFETENSORS, ".pth": PICKLE, ".pt": PICKLE, ".bin": PICKLE, ".msgpack": MSGPACK}
_SEP = "/"  # joins a Flax variable path into one safetensors key
_HEADER_LEN_BYTES = 8  # safetensors: little-endian u64 header length, then the JSON header
_HEADER_ALIGN = 8  # safetensors pads its JSON header with spaces to a multiple of this
_STATE_DICT_KEYS = ("state_dict", "model", "model_state")  # where training scripts commonly nest the weights
# Our entry in a .pth state dict's _metadata and at the top of a .msgpack tree: framework and sha256.
DIGEST_ENTRY = "_resnet_parity"
# Our keys in a safetensors header's metadata: the format marker (DIGEST_ENTRY, with this value), the
# framework and the digest. A file with any of them is ours, so damage to the others is corruption.
FORMAT_VERSION = "1"
_DIGEST_KEYS = ("framework", "sha256")
OUR_KEYS = (DIGEST_ENTRY, *_DIGEST_KEYS)
_SHA256 = re.compile(r"[0-9a-f]{64}")

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or written; the message names the file."""


def framework_name(name: str) -> str:
    """One of FRAMEWORKS, from it or its alias ("flax" is "linen"); ValueError naming the choices otherwise."""
    framework = FRAMEWORK_ALIASES.get(name, name)
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {name!r}")
    return framework


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What a file holds: a torch state dict or a linen variables tree."""

    framework: str  # TORCH or LINEN
    tensors: Any  # dict[str, torch.Tensor] (torch) or {'params': ..., 'batch_stats': ...} of arrays (linen)


def file_format(path: str | os.PathLike) -> str:
    """'safetensors', 'pickle' or 'msgpack', from the file name's suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint suffix {suffix!r}; expected one of {', '.join(SUFFIXES)}")
    return SUFFIXES[suffix]


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (``arrays_digest``)."""
    return arrays_digest({name: torch_to_numpy(t.detach().cpu()) for name, t in tensors.items()})


def _verify(path: Path, recorded: Any, tensors: Mapping[str, torch.Tensor], ours: bool) -> None:
    """Refuse tensors that differ from the sha256 recorded when the file was written.

    ``ours``: the file carries this project's metadata, so a missing or malformed digest is corruption;
    without it (a file from another tool) the tensors load with a notice that they cannot be verified.
    """
    if recorded is None and not ours:
        log.warning("%s: no digest recorded (written by another tool?): its tensors cannot be verified", path)
        return
    if not (isinstance(recorded, str) and _SHA256.fullmatch(recorded)):
        raise CheckpointError(f"{path}: corrupted: its sha256 digest is missing or malformed ({recorded!r})")
    if tensors_digest(tensors) != recorded:
        raise CheckpointError(f"{path}: corrupted: the tensors do not match the sha256 recorded when it was written")


def _flat_flax(variables: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    flat = traverse_util.flatten_dict({k: variables[k] for k in variables})
    names = [_SEP.join(map(str, path)) for path in flat]
    return dict(zip(names, torch_views(list(flat.values())), strict=True))


def _reason(path: Path, error: Exception) -> str:
    """Why a file could not be read: an empty file says so; an exception without a message, its type."""
    try:
        if path.stat().st_size == 0:
            return "the file is empty"
    except OSError:
        pass
    return str(error) or type(error).__name__


def _state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The {name: tensor} dict a loaded torch pickle holds (top level or under 'state_dict'/'model')."""
    for candidate in (obj, *(obj.get(k) for k in _STATE_DICT_KEYS if isinstance(obj, Mapping))):
        if (
            isinstance(candidate, Mapping)
            and candidate
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in candidate.items())
        ):
            return dict(candidate)
    raise CheckpointError(
        f"{path}: expected a state dict of named tensors "
        f"(top level or under {' or '.join(map(repr, _STATE_DICT_KEYS))}), "
        f"got {type(obj).__name__}"
    )


def _read_pickle(path: Path) -> Checkpoint:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler error" in line), "")
        raise CheckpointError(
            f"{path}: refused by torch.load(weights_only=True): it holds objects other than tensors and plain "
            f"containers, or is corrupted; it is never loaded unsafely. {reason.split('. Please')[0]}"
        ) from None
    except Exception as e:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupted?): {_reason(path, e)}"
        ) from None
    tensors = _state_dict(obj, path)
    metadata = getattr(obj, "_metadata", None)
    metadata = metadata if isinstance(metadata, Mapping) else {}
    entry = metadata.get(DIGEST_ENTRY)
    recorded = entry.get("sha256") if isinstance(entry, Mapping) and entry.get("framework") == TORCH else None
    # Module versions are {'version': n}: an entry with one of our keys is ours, whatever its name became.
    ours = entry is not None or any(isinstance(v, Mapping) and set(_DIGEST_KEYS) & set(v) for v in metadata.values())
    _verify(path, recorded, tensors, ours=ours)
    return Checkpoint(TORCH, tensors)


def _header_metadata(data: bytes, path: Path) -> dict[str, str]:
    n = int.from_bytes(data[:_HEADER_LEN_BYTES], "little") if len(data) >= _HEADER_LEN_BYTES else -1
    if not 0 < n <= len(data) - _HEADER_LEN_BYTES:
        empty = ": the file is empty" if not data else ""
        raise CheckpointError(f"{path}: not a safetensors file (truncated or corrupted header){empty}")
    try:
        meta = json.loads(data[_HEADER_LEN_BYTES : _HEADER_LEN_BYTES + n]).get("__metadata__") or {}
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: corrupted safetensors header: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header: metadata is not a mapping")
    return meta


def _read_safetensors(path: Path) -> Checkpoint:
    data = path.read_bytes()
    meta = _header_metadata(data, path)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupted?): {_reason(path, e)}"
        ) from None
    _verify(path, meta.get("sha256"), tensors, ours=any(key in meta for key in OUR_KEYS))
    recorded_framework = meta.get("framework") or (
        LINEN if tensors and all(k.split(_SEP)[0] in COLLECTIONS and _SEP in k for k in tensors) else TORCH
    )
    framework = FRAMEWORK_ALIASES.get(recorded_framework, recorded_framework)
    if framework not in FILE_FRAMEWORKS:
        raise CheckpointError(
            f"{path}: metadata framework must be one of {', '.join(FILE_FRAMEWORKS)} "
            f"({', '.join(FRAMEWORK_ALIASES)} for {LINEN}), got {recorded_framework!r}"
        )
    if framework == LINEN:
        try:
            tree = traverse_util.unflatten_dict({tuple(k.split(_SEP)): torch_to_numpy(t) for k, t in tensors.items()})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: Flax keys do not form one variables tree: {e}") from None
        return Checkpoint(LINEN, tree)
    return Checkpoint(TORCH, tensors)


def _is_array_tree(tree: Any, leaf_types: tuple[type, ...] = (np.ndarray, np.generic)) -> bool:
    if isinstance(tree, Mapping):
        return all(isinstance(k, str) and _is_array_tree(v, leaf_types) for k, v in tree.items())
    return isinstance(tree, leaf_types)


def _read_msgpack(path: Path) -> Checkpoint:
    try:
        tree = flax.serialization.msgpack_restore(path.read_bytes())
    except Exception as e:
        raise CheckpointError(
            f"{path}: not a readable Flax msgpack file (truncated or corrupted?): {_reason(path, e)}"
        ) from None
    entry = tree.pop(DIGEST_ENTRY, None) if isinstance(tree, dict) else None
    if not (isinstance(tree, Mapping) and "params" in tree and _is_array_tree(tree)):
        raise CheckpointError(f"{path}: expected Flax variables {{'params': ..., 'batch_stats': ...}} of arrays")
    # Only the collections and our digest entry sit at the top: another name there is a damaged one.
    others = sorted(set(tree) - set(COLLECTIONS))
    if others:
        raise CheckpointError(
            f"{path}: unexpected top-level entries {others}; Flax variables hold only {', '.join(COLLECTIONS)}"
        )
    digest = entry.get("sha256") if isinstance(entry, Mapping) else None
    recorded = digest.tobytes().hex() if isinstance(digest, np.ndarray) and digest.dtype == np.uint8 else None
    _verify(path, recorded, _flat_flax(tree), ours=entry is not None)
    return Checkpoint(LINEN, tree)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a .safetensors, .pth/.pt or .msgpack file; CheckpointError names the file on any failure."""
    path = Path(path)
    fmt = file_format(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    return {SAFETENSORS: _read_safetensors, PICKLE: _read_pickle, MSGPACK: _read_msgpack}[fmt](path)


def _torch_pickle(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """torch.save bytes of a state dict whose _metadata (module versions, if any) also holds our digest."""
    state_dict = OrderedDict(tensors)
    metadata = {
        **getattr(tensors, "_metadata", {}),
        DIGEST_ENTRY: {"framework": TORCH, "sha256": tensors_digest(state_dict)},
    }
    state_dict._metadata = metadata  # type: ignore[attr-defined]  # where nn.Module.state_dict keeps versions
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getvalue()


def _flax_msgpack(variables: Mapping[str, Any]) -> bytes:
    """msgpack bytes of Flax variables plus our entry: the sha256 as 32 uint8 (strings would not pass jax.jit)."""
    tree = jax.device_get(dict(variables))
    digest = np.frombuffer(bytes.fromhex(tensors_digest(_flat_flax(tree))), np.uint8)
    return flax.serialization.msgpack_serialize({**tree, DIGEST_ENTRY: {"sha256": digest}})


# What write_checkpoint takes for each framework name.
_EXPECTED = {
    TORCH: "a torch state dict {name: torch.Tensor}",
    LINEN: "Flax variables {'params': ..., 'batch_stats': ...} of arrays",
    NNX: "an NNX model (resnet_flax.nnx.ResNet)",
}


def _is_nnx_module(obj: Any) -> bool:
    """An nnx.Module; without flax.nnx imported, nothing can be one."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(obj, nnx.Module)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _is_variables(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "params" in obj and _is_array_tree(obj, (jax.Array, np.ndarray, np.generic))


def _framework_of(obj: Any) -> str | None:
    """The framework whose weights obj is, if any."""
    checks = {NNX: _is_nnx_module, TORCH: _is_state_dict, LINEN: _is_variables}
    return next((framework for framework, check in checks.items() if check(obj)), None)


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping) and obj and _is_state_dict(obj):
        return "a dict of torch.Tensor"
    if isinstance(obj, Mapping) and "params" in obj:
        return f"Flax variables ({', '.join(sorted(map(str, obj)))})"
    if isinstance(obj, Mapping):
        return f"a dict holding {', '.join(sorted({type(v).__name__ for v in obj.values()})) or 'nothing'}"
    return type(obj).__name__


def _check_weights(path: Path, tensors: Any, framework: str, given: str) -> None:
    """TypeError saying what ``framework``'s weights are, unless ``tensors`` are those."""
    found = _framework_of(tensors)
    if found == framework and (framework != TORCH or tensors):
        return
    hint = f" ({found} weights: pass framework={found!r})" if found is not None and found != framework else ""
    raise TypeError(f"{path}: {given} weights are {_EXPECTED[framework]}, got {_describe(tensors)}{hint}")


def _sorted_metadata(data: bytes) -> bytes:
    """safetensors bytes with the header's metadata in key order.

    The writer orders the metadata as a hash map iterates, which differs from call to call; the same
    weights and metadata should give the same file. Tensor offsets count from the end of the header,
    so the header may be written anew.
    """
    n = int.from_bytes(data[:_HEADER_LEN_BYTES], "little")
    header = json.loads(data[_HEADER_LEN_BYTES : _HEADER_LEN_BYTES + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % _HEADER_ALIGN)
    return len(text).to_bytes(_HEADER_LEN_BYTES, "little") + text + data[_HEADER_LEN_BYTES + n :]


def write_checkpoint(
    path: str | os.PathLike,
    tensors: Any,
    framework: str,
    metadata: Mapping[str, str] | None = None,
    check: Callable[[Path], None] | None = None,
) -> int:
    """Write a torch state dict, linen variables or an NNX model in the format the suffix names; returns the
    file size.

    ``framework`` is "torch", "linen" (or "flax") or "nnx". safetensors takes any; .pth/.pt only a torch
    state dict; .msgpack only linen variables or an NNX model, whose state is written as the linen
    variables tree it is. The weights are written as given, for every framework alike: their values
    are checked where they are converted or loaded (``bad_values``), not here. Every format records a
    sha256 of the tensors. ``check`` gets the written file under its temporary name and may raise to
    keep it from ever reaching ``path`` (see ``atomic_write``). An object that is not the weights
    ``framework`` names (a state dict for "linen", say) raises TypeError saying what was expected,
    before anything is written.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file name (str or os.PathLike), got {type(path).__name__}")
    path = Path(path)
    fmt = file_format(path)
    given, framework = framework, framework_name(framework)
    _check_weights(path, tensors, framework, given)
    if framework == NNX:
        from .nnx import nnx_variables  # flax.nnx only when asked for

        tensors, framework = nnx_variables(tensors), LINEN
    if fmt == PICKLE and framework != TORCH:
        raise CheckpointError(f"{path}: a {fmt} file holds torch weights, not {framework}")
    if fmt == MSGPACK and framework != LINEN:
        raise CheckpointError(f"{path}: a {fmt} file holds flax weights ({LINEN} or {NNX}), not {framework}")
    try:
        if fmt == SAFETENSORS:
            flat = _flat_flax(tensors) if framework == LINEN else {k: t.contiguous() for k, t in tensors.items()}
            meta = {
                **(metadata or {}),
                DIGEST_ENTRY: FORMAT_VERSION,
                "framework": framework,
                "sha256": tensors_digest(flat),
            }
            data = _sorted_metadata(safetensors.torch.save(flat, meta))
        else:
            # Serialised in memory first: torch.save reports a full disk as RuntimeError, os.write as OSError.
            data = _torch_pickle(tensors) if fmt == PICKLE else _flax_msgpack(tensors)
        return atomic_write(path, lambda f: f.write(data), check)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write: {e}") from e
