"""Small file helpers: atomic writes and tensor hashing.

Every file splatdd writes (distilled files, checkpoints, results) goes through
:func:`atomic_write_bytes` / :func:`atomic_torch_save`: the data is written to a temporary file in the
destination's own directory, flushed and ``fsync``-ed, then moved over the destination with
``os.replace``. A reader therefore sees either the old file or the complete new one, never a torn
write, even if the process is killed mid-way.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import torch

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
           "atomic_open", "tensor_bytes", "tensor_sha256"]


def _fsync_dir(directory: Path) -> None:
    """Best effort: make the rename itself durable (not supported on every OS/filesystem)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Context manager yielding a binary file object; on a clean exit its content atomically
    replaces ``path``; on an exception the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_umask())     # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (tmp file in the same directory + fsync + os.replace)."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically."""
    with atomic_open(path) as f:
        torch.save(obj, f)


def atomic_save_with(path: str | os.PathLike, writer: Callable[[BinaryIO], None]) -> None:
    """Call ``writer(fileobj)`` and atomically move the result to ``path`` (for e.g. matplotlib)."""
    with atomic_open(path) as f:
        writer(f)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor in its own dtype (row-major, CPU), as safetensors stores them."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.numel() == 0:
        return b""
    return t.view(torch.uint8).numpy().tobytes()


def tensor_sha256(t: torch.Tensor) -> str:
    """Hex sha256 of :func:`tensor_bytes`."""
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


