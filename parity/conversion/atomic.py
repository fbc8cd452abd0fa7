"""Files written whole or not at all, and digests of arrays' bytes; imports no framework.

The trainer writes its run files and checkpoint digests through this module, so it needs neither
torch nor jax to do so.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import stat
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

_MAX_SYMLINKS = 40  # as the kernel's own limit on a path's symlinks
_TOKEN_BYTES = 6  # random bytes in a temporary file's name: two writers of one file never collide


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
    if descriptor is not None:
        fd = os.dup(descriptor)
    else:  # without blocking: a FIFO nobody reads is an error (ENXIO), not a wait without end
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.set_blocking(fd, True)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return len(data)


def _temporary(target: Path) -> Path:
    """The name a replacement of target is written under: hidden, beside it, ending in its suffix."""
    return target.with_name(f".{target.stem}.{secrets.token_hex(_TOKEN_BYTES)}.tmp{target.suffix}")


def stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """The temporary files ``atomic_write`` leaves in folder only when its process is killed mid-write."""
    pattern = re.compile(rf"\.(.+)\.[0-9a-f]{{{2 * _TOKEN_BYTES}}}\.tmp(\.[^.]+)?")
    return sorted(p for p in Path(folder).iterdir() if pattern.fullmatch(p.name) and p.is_file())


def _replace(target: Path, write: Callable[[IO[bytes]], object], check: Callable[[Path], None] | None) -> int:
    """Fill a new file beside target, fsync it, check it, rename it over target, fsync the folder."""
    old = target.stat() if target.exists() else None
    # Name ends in the target's suffix so that check() can read it as that format.
    tmp = _temporary(target)
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


def is_stream(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a stream (our own stdout as /dev/stdout or /dev/fd/N, a FIFO, a socket): each write to
    it adds to what a reader gets, so a document meant to be replaced must be written to it once."""
    path = Path(path)
    if _own_descriptor(path) is not None:
        return True
    target = Path(os.path.realpath(path))
    return target.exists() and (stat.S_ISFIFO(target.stat().st_mode) or stat.S_ISSOCK(target.stat().st_mode))


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


def arrays_digest(arrays: Mapping[str, Any]) -> str:
    """sha256 over every array's name, dtype, shape and bytes, in name order.

    Arrays are anything numpy reads (numpy, jax on the host, ml_dtypes' bfloat16). The dtype is
    spelled as torch spells it (``torch.float32``), so a torch state dict and the same weights as
    arrays have one digest.
    """
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|torch.{a.dtype.name}|{tuple(a.shape)}|".encode())
        h.update(a.reshape(-1).view(np.uint8).data)
    return h.hexdigest()
