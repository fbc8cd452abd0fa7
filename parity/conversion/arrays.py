"""Host arrays between torch, numpy and jax: views where memory can be shared, one layout copy where not.

Every converted leaf is written once, by torch, into fresh memory that the result then owns:
a jax array adopts an aligned numpy buffer on CPU, a torch tensor is its own buffer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import ml_dtypes
import numpy as np
import torch

# XLA's CPU client adopts a host buffer without copying only when it is this well aligned.
_ALIGN = 64

# numpy has no bfloat16 of its own; ml_dtypes' is the one jax uses.
_BF16 = np.dtype(ml_dtypes.bfloat16)
_TORCH_TO_NUMPY: dict[torch.dtype, np.dtype] = {
    torch.bool: np.dtype(np.bool_),
    torch.uint8: np.dtype(np.uint8),
    torch.uint16: np.dtype(np.uint16),  # wider unsigned integers: optimizer step counters (nnx.Optimizer)
    torch.uint32: np.dtype(np.uint32),
    torch.uint64: np.dtype(np.uint64),
    torch.int8: np.dtype(np.int8),
    torch.int16: np.dtype(np.int16),
    torch.int32: np.dtype(np.int32),
    torch.int64: np.dtype(np.int64),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: _BF16,
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
}
_NUMPY_TO_TORCH = {v: k for k, v in _TORCH_TO_NUMPY.items()}


def numpy_dtype(dtype: Any) -> np.dtype:
    """A numpy dtype from a torch dtype, a numpy/jax dtype or its name."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_TO_NUMPY:
            raise ValueError(f"unsupported torch dtype {dtype}; expected one of {', '.join(map(str, _TORCH_TO_NUMPY))}")
        return _TORCH_TO_NUMPY[dtype]
    return np.dtype(dtype)


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype of a numpy dtype (bfloat16 included)."""
    if np.dtype(dtype) not in _NUMPY_TO_TORCH:
        raise ValueError(f"unsupported dtype {dtype}; expected one of {', '.join(map(str, _NUMPY_TO_TORCH))}")
    return _NUMPY_TO_TORCH[np.dtype(dtype)]


def torch_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor's memory (bfloat16 included); no copy."""
    if t.dtype == torch.bfloat16:
        return t.detach().view(torch.int16).numpy().view(_BF16)
    return t.detach().numpy()


def numpy_to_torch(a: np.ndarray) -> torch.Tensor:
    """A tensor sharing a numpy array's memory through DLPack (bfloat16 and read-only arrays
    included; write through it only to a writable array); no copy."""
    # DLPack has no ml_dtypes bfloat16: share the bits as int16 and reinterpret.
    if a.dtype == _BF16:
        return torch.from_dlpack(a.view(np.int16)).view(torch.bfloat16)
    torch_dtype(a.dtype)  # raises ValueError naming the dtype when torch has none like it
    return torch.from_dlpack(a)


def torch_views(leaves: list[Any]) -> list[torch.Tensor]:
    """Tensors over jax or numpy arrays' host memory, to be read only.

    jax arrays come to the CPU in one batched transfer (none when already there); jax and numpy
    arrays (read-only ones included) are then shared through DLPack, without a copy.
    """
    on_device = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
    host = dict(zip(on_device, jax.device_put([leaves[i] for i in on_device], jax.devices("cpu")[0]), strict=True))
    return [torch.from_dlpack(host[i]) if i in host else numpy_to_torch(np.asarray(x)) for i, x in enumerate(leaves)]


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an _ALIGN-byte boundary."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _transpose2d_into(src: torch.Tensor, out: torch.Tensor) -> None:
    """out (C, R) = src (R, C).T; torch copies a 2-D transpose in cache blocks, the fast path."""
    out.copy_(src.reshape(src.shape[0], -1).t())


def permuted_copy(src: torch.Tensor, perm: tuple[int, ...] | None, out: torch.Tensor) -> None:
    """Write ``src.permute(perm)`` into the contiguous ``out`` (cast to out's dtype).

    A permutation that sends the first axis last (OIHW -> HWIO, (out, in) -> (in, out)) or the last
    axis first (the inverse) is done as one 2-D transpose plus a copy that moves whole rows, which
    is faster than a general strided copy (docs/performance.md).
    """
    n = src.dim()
    if perm is None:
        out.copy_(src)
    elif perm[-1] == 0 and src.dtype == out.dtype:
        rest = tuple(p - 1 for p in perm[:-1])
        if rest == tuple(range(n - 1)):
            _transpose2d_into(src, out.view(-1, src.shape[0]))
            return
        moved = torch.empty((*src.shape[1:], src.shape[0]), dtype=src.dtype)
        _transpose2d_into(src, moved.view(-1, src.shape[0]))
        out.copy_(moved.permute(*rest, n - 1))
    elif perm[0] == n - 1 and src.dtype == out.dtype:
        rest = perm[1:]
        if rest == tuple(range(n - 1)):
            _transpose2d_into(src.reshape(-1, src.shape[-1]), out.view(src.shape[-1], -1))
            return
        moved = src.permute(*rest, n - 1).contiguous()
        _transpose2d_into(moved.view(-1, src.shape[-1]), out.view(src.shape[-1], -1))
    else:
        out.copy_(src.permute(perm))


def to_jax(arrays: dict[Any, np.ndarray]) -> dict[Any, jax.Array]:
    """jax arrays of fresh host arrays, in one batched call; on CPU they adopt the memory, no copy."""
    return jax.device_put(arrays, may_alias=True)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch's copies on one thread, restoring the setting after.

    Layout copies are memory-bound: a second intra-op thread adds nothing, and on a busy CPU its
    synchronisation slows the conversion down (docs/performance.md).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
