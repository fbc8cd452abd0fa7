"""Checkpoint files: safetensors (the default), PyTorch ``.pth``/``.pt`` and Flax msgpack.

safetensors holds one flat ``{name: tensor}`` dict, so the two frameworks use two key schemes:

- torch side: the state-dict keys as they are (``conv1.0.weight`` or torchvision's ``conv1.weight``);
- Flax side: the variable path joined with ``/`` (``params/conv1/0/kernel``,
  ``batch_stats/conv1/1/mean``), arrays in Flax layout (HWIO kernels).

Every file written here carries a ``sha256`` over every tensor's name, dtype, shape and bytes,
checked when the file is read back, so a flipped bit is an error rather than a silently different
weight: in the safetensors header metadata (with ``framework``, "torch" or "flax"), in a ``.pth``
state dict's ``_metadata`` (which ``load_state_dict(strict=True)`` reads only by module name, so
other loaders see a plain state dict), in a ``.msgpack`` tree as one extra entry (32 uint8 bytes,
which ``flax.serialization.from_bytes`` ignores). A file of ours whose digest is missing or
malformed is corrupted; a file without any of our metadata (written by another tool) loads with a
one-line notice that it cannot be verified. Torch pickles are read with
``torch.load(weights_only=True)`` only, never retried unsafely. Writes go through ``atomic_write``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import pickle
import re
import secrets
import stat
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import flax.serialization
import jax
import numpy as np
import safetensors.torch
import torch
from flax import traverse_util

from .arrays import torch_to_numpy, torch_views

TORCH = "torch"
FLAX = "flax"
# An NNX model's state is the Flax variables tree: it is written as a Flax file, which either API reads.
NNX = "nnx"
FRAMEWORKS = (TORCH, FLAX, NNX)
FILE_FRAMEWORKS = (TORCH, FLAX)  # what a file's header records
SAFETENSORS, PICKLE, MSGPACK = "safetensors", "pickle", "msgpack"
SUFFIXES = {".safetensors": SAFETENSORS, ".pth": PICKLE, ".pt": PICKLE, ".bin": PICKLE, ".msgpack": MSGPACK}
FLAX_COLLECTIONS = ("params", "batch_stats")
_SEP = "/"  # joins a Flax variable path into one safetensors key
_HEADER_LEN_BYTES = 8  # safetensors: little-endian u64 header length, then the JSON header
_STATE_DICT_KEYS = ("state_dict", "model", "model_state")  # where training scripts commonly nest the weights
# Our entry in a .pth state dict's _metadata and at the top of a .msgpack tree: framework and sha256.
DIGEST_ENTRY = "_resnet_parity"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_SYMLINKS = 40  # as the kernel's own limit on a path's symlinks

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or written; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What a file holds: a torch state dict or a Flax variables tree, and the header metadata."""

    framework: str
    tensors: Any  # dict[str, torch.Tensor] (torch) or {'params': ..., 'batch_stats': ...} of arrays (flax)
    metadata: dict[str, str]


def file_format(path: str | os.PathLike) -> str:
    """'safetensors', 'pickle' or 'msgpack', from the file name's suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint suffix {suffix!r}; expected one of {', '.join(SUFFIXES)}")
    return SUFFIXES[suffix]


def _own_descriptor(path: Path) -> int | None:
    """N when path leads, through symlinks, to /proc/self/fd/N (/dev/stdout, /dev/fd/N): our own open stream."""
    p = os.path.abspath(path)
    for _ in range(_MAX_SYMLINKS):
        name = os.path.basename(p)
        if os.path.realpath(os.path.dirname(p)) == f"/proc/{os.getpid()}/fd" and name.isdigit():
            return int(name)
        if not os.path.islink(p):
            return None
        p = os.path.join(os.path.dirname(p), os.readlink(p))
    return None


def _write_through(path: Path, descriptor: int | None, write: Callable[[IO[bytes]], object]) -> int:
    """Write into something that is not a regular file (our stdout, a FIFO, a device) without replacing it."""
    buffer = io.BytesIO()
    write(buffer)
    data = buffer.getvalue()
    if descriptor is not None:  # our own stream: what was printed before must come first
        sys.stdout.flush()
        sys.stderr.flush()
    fd = os.dup(descriptor) if descriptor is not None else os.open(path, os.O_WRONLY)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return len(data)


def _replace(target: Path, write: Callable[[IO[bytes]], object], check: Callable[[Path], None] | None) -> int:
    """Fill a new file beside target, fsync it, check it, rename it over target, fsync the folder."""
    old = target.stat() if target.exists() else None
    # Name ends in the target's suffix so that check() can read it as that format.
    tmp = target.with_name(f".{target.stem}.{secrets.token_hex(6)}.tmp{target.suffix}")
    # O_EXCL with mode 0o666: the kernel applies the umask, as for any new file (mkstemp would give 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if old is not None:
                os.fchmod(f.fileno(), stat.S_IMODE(old.st_mode))
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return target.stat().st_size


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO[bytes]], object], check: Callable[[Path], None] | None = None
) -> int:
    """Call ``write`` on a file for ``path`` and put the result in place whole; returns the bytes written.

    A regular file (or a new one) is replaced atomically: a temp file beside it is written, fsynced,
    given to ``check`` (which may raise to refuse it) and renamed into place, so ``path`` holds the
    old content or the new, never a part. A new file gets 0o666 less the umask (0644 by default), a
    replaced one keeps its mode. A symlink is followed: the file it points at is replaced, beside
    itself, and the link stays. Anything else (our own stdout as /dev/stdout or /dev/fd/N, a FIFO,
    a device) is written through, never replaced; there ``check`` cannot run first, so it is refused.
    On failure nothing but ``path``'s old content is left; an OSError names ``path``.
    """
    path = Path(path)
    descriptor = _own_descriptor(path)
    target = Path(os.path.realpath(path))
    try:
        if descriptor is None and (not target.exists() or stat.S_ISREG(target.stat().st_mode)):
            return _replace(target, write, check)
        if check is not None:
            raise ValueError(f"{path}: not a regular file, so it cannot be checked before it is written")
        return _write_through(path, descriptor, write)
    except OSError as e:
        if e.errno is not None and e.filename != str(path):  # name the path asked for, not a temp name
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


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
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupted?): {e}") from None
    tensors = _state_dict(obj, path)
    metadata = getattr(obj, "_metadata", None)
    entry = metadata.get(DIGEST_ENTRY) if isinstance(metadata, Mapping) else None
    recorded = entry.get("sha256") if isinstance(entry, Mapping) and entry.get("framework") == TORCH else None
    _verify(path, recorded, tensors, ours=entry is not None)
    return Checkpoint(TORCH, tensors, {})


def _header_metadata(data: bytes, path: Path) -> dict[str, str]:
    n = int.from_bytes(data[:_HEADER_LEN_BYTES], "little") if len(data) >= _HEADER_LEN_BYTES else -1
    if not 0 < n <= len(data) - _HEADER_LEN_BYTES:
        raise CheckpointError(f"{path}: not a safetensors file (truncated or corrupted header)")
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
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupted?): {e}") from None
    _verify(path, meta.get("sha256"), tensors, ours="framework" in meta or "sha256" in meta)
    framework = meta.get("framework") or (
        FLAX if tensors and all(k.split(_SEP)[0] in FLAX_COLLECTIONS and _SEP in k for k in tensors) else TORCH
    )
    if framework not in FILE_FRAMEWORKS:
        raise CheckpointError(
            f"{path}: metadata framework must be one of {', '.join(FILE_FRAMEWORKS)}, got {framework!r}"
        )
    if framework == FLAX:
        try:
            tree = traverse_util.unflatten_dict({tuple(k.split(_SEP)): torch_to_numpy(t) for k, t in tensors.items()})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: Flax keys do not form one variables tree: {e}") from None
        return Checkpoint(FLAX, tree, meta)
    return Checkpoint(TORCH, tensors, meta)


def _is_array_tree(tree: Any) -> bool:
    if isinstance(tree, Mapping):
        return all(isinstance(k, str) and _is_array_tree(v) for k, v in tree.items())
    return isinstance(tree, (np.ndarray, np.generic))


def _read_msgpack(path: Path) -> Checkpoint:
    try:
        tree = flax.serialization.msgpack_restore(path.read_bytes())
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable Flax msgpack file (truncated or corrupted?): {e}") from None
    entry = tree.pop(DIGEST_ENTRY, None) if isinstance(tree, dict) else None
    if not (isinstance(tree, Mapping) and "params" in tree and _is_array_tree(tree)):
        raise CheckpointError(f"{path}: expected Flax variables {{'params': ..., 'batch_stats': ...}} of arrays")
    # Only the collections and our digest entry sit at the top: another name there is a damaged one.
    others = sorted(set(tree) - set(FLAX_COLLECTIONS))
    if others:
        raise CheckpointError(
            f"{path}: unexpected top-level entries {others}; Flax variables hold only {', '.join(FLAX_COLLECTIONS)}"
        )
    digest = entry.get("sha256") if isinstance(entry, Mapping) else None
    recorded = digest.tobytes().hex() if isinstance(digest, np.ndarray) and digest.dtype == np.uint8 else None
    _verify(path, recorded, _flat_flax(tree), ours=entry is not None)
    return Checkpoint(FLAX, tree, {})


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


def write_checkpoint(
    path: str | os.PathLike,
    tensors: Any,
    framework: str,
    metadata: Mapping[str, str] | None = None,
    check: Callable[[Path], None] | None = None,
) -> int:
    """Write a torch state dict, Flax variables or an NNX model in the format the suffix names; returns the
    file size.

    safetensors takes any; .pth/.pt only a torch state dict; .msgpack only Flax variables or an NNX model.
    Every format records a sha256 of the tensors. ``check`` gets the written file under its temporary
    name and may raise to keep it from ever reaching ``path`` (see ``atomic_write``).
    """
    path = Path(path)
    fmt = file_format(path)
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
    if framework == NNX:
        from .nnx import nnx_to_linen  # flax.nnx only when asked for

        tensors, framework = nnx_to_linen(tensors), FLAX
    if fmt == PICKLE and framework != TORCH or fmt == MSGPACK and framework != FLAX:
        raise CheckpointError(f"{path}: a {fmt} file holds {TORCH if fmt == PICKLE else FLAX} weights, not {framework}")
    try:
        if fmt == SAFETENSORS:
            flat = _flat_flax(tensors) if framework == FLAX else {k: t.contiguous() for k, t in tensors.items()}
            meta = {**(metadata or {}), "framework": framework, "sha256": tensors_digest(flat)}
            data = safetensors.torch.save(flat, meta)
        else:
            # Serialised in memory first: torch.save reports a full disk as RuntimeError, os.write as OSError.
            data = _torch_pickle(tensors) if fmt == PICKLE else _flax_msgpack(tensors)
        return atomic_write(path, lambda f: f.write(data), check)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write: {e}") from e
