"""Run-folder safety: one writer per folder, no stale temporary files, clear write errors.

A distillation run writes its checkpoint, history, plot and distilled file into one folder
(``--out``). This module provides the pieces :func:`splatdd.distill.distill` and
:func:`splatdd.experiment.run` use around that folder::

    check_writable(out)                      # before any expensive work
    with RunLock(out):                       # a second writer gets RunFolderBusy (holder's PID)
        clean_stale_temps(out)               # leftovers of writes killed mid-way
        with translate_write_errors("checkpoint", kept="the previous checkpoint"):
            atomic_torch_save(state, out / "checkpoint.pt")

Every error is a :class:`RunFolderError` whose message names the folder or file and says what to
do; the CLI prints it as ``splatdd: error: ...``.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from pathlib import Path
from types import TracebackType
from typing import Iterator

__all__ = ["RunFolderError", "RunFolderBusy", "RunFolderNotWritable", "WriteFailed", "RunLock",
           "LOCK_NAME", "clean_stale_temps", "check_writable", "translate_write_errors",
           "is_temp_name"]

#: The lock file inside a run folder (kept after the run: deleting it would race with a waiter).
LOCK_NAME = ".lock"

#: errno values a write can fail with that are the folder's or the disk's fault, not a bug.
_WRITE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
                 errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                 errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large",
                 errno.EISDIR: "a directory is in the way", errno.ENOTDIR: "a file is in the way",
                 errno.EEXIST: "a file is in the way"}
#: What torch.save raises when the underlying write fails (the OSError itself is lost).
_TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


class RunFolderError(RuntimeError):
    """A run folder cannot be used as asked; the message says why and what to do."""


class RunFolderBusy(RunFolderError):
    """Another process holds the folder's lock. ``pid`` is the holder (``None`` if unknown)."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


class RunFolderNotWritable(RunFolderError):
    """The folder is a file, read-only, not permitted, or cannot be created."""


class WriteFailed(RunFolderError):
    """A write failed (disk full, read-only, permissions); the message says what was kept."""


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary file of :func:`splatdd.io_utils.atomic_open`
    (``.<target>.<random>.tmp``) or of :func:`check_writable`.

    >>> is_temp_name(".checkpoint.pt.k2j3h4.tmp"), is_temp_name("checkpoint.pt")
    (True, False)
    """
    return name.startswith(".") and name.endswith(".tmp") and len(name) > 5


class RunLock:
    """Exclusive lock on a run folder: ``fcntl.flock`` on ``out_dir/.lock``, held while the
    ``with`` block runs and released by the kernel when the process dies (so ``kill -9`` leaves no
    stale lock). A second holder, in this or another process, gets :class:`RunFolderBusy` naming
    the holder's PID (written into the lock file)::

        with RunLock("runs/fmnist"):
            ...   # the only writer of runs/fmnist
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            raise RunFolderError(f"{self.path}: this RunLock is already held")
        check_writable(self.out_dir, probe=False)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise RunFolderNotWritable(f"cannot create the lock file {self.path}: "
                                       f"{_reason(exc)}") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RunFolderNotWritable(f"{self.path} exists and is not a regular file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                deadline = time.monotonic() + 1.0     # the holder writes its PID right after
                while pid is None and time.monotonic() < deadline:   # taking the lock
                    time.sleep(0.005)
                    pid = _read_pid(fd)
                who = f"PID {pid}" if pid is not None else "a process whose PID is not known yet"
                raise RunFolderBusy(f"{self.out_dir} is in use by another splatdd run ({who}); "
                                    f"wait for it to finish or use another --out", pid) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)            # no PID: nobody holds it
        except OSError:
            pass
        finally:
            os.close(fd)                   # closing releases the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def clean_stale_temps(out_dir: str | os.PathLike, *, lock: RunLock | None = None) -> list[Path]:
    """Remove the temporary files (``.*.tmp``) that writes killed mid-way left in ``out_dir``;
    returns what was removed. Call it while holding the folder's :class:`RunLock` (pass it as
    ``lock`` to have that checked): then no live writer owns any of them::

        with RunLock(out) as lock:
            clean_stale_temps(out, lock=lock)
    """
    out_dir = Path(out_dir)
    if lock is not None and not (lock.held and lock.out_dir.resolve() == out_dir.resolve()):
        raise RunFolderError(f"clean_stale_temps({out_dir}) needs that folder's RunLock held")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(out_dir))
    except FileNotFoundError:
        return removed
    for e in entries:
        if is_temp_name(e.name) and e.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(e.path)
                removed.append(Path(e.path))
    return removed


def check_writable(out_dir: str | os.PathLike, *, probe: bool = True) -> Path:
    """Make sure ``out_dir`` is (or can be made) a folder this process can write, before any
    expensive work: creates it (and its parents) and, with ``probe``, writes and removes a small
    file in it (which catches read-only file systems even for root). Raises
    :class:`RunFolderNotWritable` saying what is wrong::

        check_writable("runs/fmnist")
    """
    out_dir = Path(out_dir)
    for p in [out_dir, *out_dir.parents]:
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                what = "is a file" if p == out_dir else f"is below {p}, which is a file"
                raise RunFolderNotWritable(f"--out {out_dir} {what}, not a folder; choose a "
                                           f"folder path")
            break
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderNotWritable(f"cannot create the output folder {out_dir}: "
                                   f"{_reason(exc)}") from exc
    if probe:
        test = out_dir / f".write-test.{os.getpid()}.tmp"
        try:
            fd = os.open(test, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, b"splatdd")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise RunFolderNotWritable(f"the output folder {out_dir} is not writable: "
                                       f"{_reason(exc)}") from exc
        finally:
            with contextlib.suppress(OSError):
                os.unlink(test)
    return out_dir


def _reason(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    text = _WRITE_ERRNOS.get(exc.errno or 0) or exc.strerror or str(exc)
    return f"{text} ({name})" if name else text


@contextlib.contextmanager
def translate_write_errors(what: str, *, kept: str | None = None, hint: str | None = None
                           ) -> Iterator[None]:
    """Turn a failed write inside the block (``OSError`` ENOSPC, EROFS, EACCES, EPERM, EDQUOT,
    EFBIG, EISDIR, ENOTDIR, EEXIST (a file where a folder must be), or torch.save's
    ``RuntimeError: ... unexpected pos`` from a full disk) into
    :class:`WriteFailed` saying what could not be written, what was ``kept`` and how to go on
    (``hint``). Other errors pass through unchanged::

        with translate_write_errors("checkpoint out/checkpoint.pt",
                                    kept="the previous checkpoint (step 500)",
                                    hint="free some space, then rerun with --resume"):
            atomic_torch_save(state, "out/checkpoint.pt")
    """
    tail = f"; kept: {kept}" if kept else ""
    tail += f"; {hint}" if hint else ""
    try:
        yield
    except WriteFailed:
        raise
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        raise WriteFailed(f"cannot write {what}: {_reason(exc)}{tail}") from exc
    except RuntimeError as exc:
        if not any(s in str(exc) for s in _TORCH_WRITE_FAILURES):
            raise
        raise WriteFailed(f"cannot write {what}: the write failed (disk full?){tail}") from exc
