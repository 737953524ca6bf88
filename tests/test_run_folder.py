"""Run-folder safety (splatdd.run_folder): the lock (two processes racing, kill -9 of the holder),
stale temp files after a kill mid-write, writability checks, translated write failures (a
simulated full disk under torch.save)."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from splatdd import io_utils
from splatdd.io_utils import atomic_torch_save
from splatdd.run_folder import (LOCK_NAME, RunFolderBusy, RunFolderError, RunFolderNotWritable,
                                RunLock, WriteFailed, check_writable, clean_stale_temps,
                                is_temp_name, translate_write_errors)

pytestmark = pytest.mark.usefixtures("one_thread")

import splatdd.run_folder as _rf  # noqa: E402

RUN_FOLDER_PY = str(Path(_rf.__file__))


def _spawn(code: str) -> subprocess.Popen:
    """A Python child running ``code`` (stdout piped, one line per event)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _line(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    """The child's next stdout line (fails after ``timeout`` s instead of hanging)."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        proc.kill()
        raise AssertionError(f"child printed nothing in {timeout} s; stderr: {proc.stderr.read()}")
    return proc.stdout.readline().strip()


# ---- the lock ----------------------------------------------------------------------------------------
def test_lock_records_the_pid_and_refuses_a_second_holder(tmp_path):
    with RunLock(tmp_path / "run") as lock:
        assert lock.held
        assert (tmp_path / "run" / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(RunFolderBusy) as e:
            RunLock(tmp_path / "run").acquire()
        assert e.value.pid == os.getpid()
        assert f"PID {os.getpid()}" in str(e.value) and str(tmp_path / "run") in str(e.value)
    assert not lock.held
    with RunLock(tmp_path / "run"):            # released: free again
        pass


def test_two_processes_racing_for_one_folder(tmp_path):
    """Both children wait for a 'go' file, then take the lock at the same moment: exactly one
    wins; the other is refused with the winner's PID."""
    out, go, done = tmp_path / "run", tmp_path / "go", tmp_path / "done"
    code = f"""
        import importlib.util, os, time
        spec = importlib.util.spec_from_file_location("run_folder", {RUN_FOLDER_PY!r})
        rf = importlib.util.module_from_spec(spec); spec.loader.exec_module(rf)   # no torch import
        RunLock, RunFolderBusy = rf.RunLock, rf.RunFolderBusy
        print("ready", flush=True)
        while not os.path.exists({str(go)!r}):
            time.sleep(0.001)
        try:
            with RunLock({str(out)!r}):
                print("won", os.getpid(), flush=True)
                while not os.path.exists({str(done)!r}):    # hold until both have reported
                    time.sleep(0.001)
        except RunFolderBusy as e:
            print("busy", e.pid, flush=True)
    """
    procs = [_spawn(code) for _ in range(2)]
    assert [_line(p) for p in procs] == ["ready", "ready"]
    go.touch()
    results = [_line(p).split() for p in procs]
    done.touch()
    for p in procs:
        p.wait(60)
    assert sorted(r[0] for r in results) == ["busy", "won"], results
    winner = next(r for r in results if r[0] == "won")
    loser = next(r for r in results if r[0] == "busy")
    assert loser[1] == winner[1]                      # the refusal names the holder's PID


def test_kill_9_of_the_holder_releases_the_lock(tmp_path):
    out = tmp_path / "run"
    p = _spawn(f"""
        import importlib.util, time
        spec = importlib.util.spec_from_file_location("run_folder", {RUN_FOLDER_PY!r})
        rf = importlib.util.module_from_spec(spec); spec.loader.exec_module(rf)   # no torch import
        with rf.RunLock({str(out)!r}):
            print("locked", flush=True)
            time.sleep(600)
    """)
    assert _line(p) == "locked"
    with pytest.raises(RunFolderBusy, match=f"PID {p.pid}"):
        RunLock(out).acquire()
    p.send_signal(signal.SIGKILL)
    p.wait(60)
    with RunLock(out) as lock:                       # the kernel dropped the dead holder's lock
        assert lock.held


# ---- stale temp files ------------------------------------------------------------------------------
def test_kill_during_a_checkpoint_write_leaves_a_temp_that_the_next_start_removes(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    ckpt = out / "checkpoint.pt"
    previous = {"step": 5, "w": torch.arange(10.0)}
    atomic_torch_save(previous, ckpt)
    p = _spawn(f"""
        import time
        from splatdd.io_utils import atomic_open
        with atomic_open({str(ckpt)!r}) as f:
            f.write(b"partial checkpoint bytes")
            f.flush()
            print("writing", flush=True)
            time.sleep(600)
    """)
    assert _line(p) == "writing"
    p.send_signal(signal.SIGKILL)
    p.wait(60)
    temps = [q for q in out.iterdir() if is_temp_name(q.name)]
    assert len(temps) == 1 and temps[0].name.startswith(".checkpoint.pt.")
    assert torch.equal(torch.load(ckpt)["w"], previous["w"])          # old checkpoint intact
    with RunLock(out) as lock:
        removed = clean_stale_temps(out, lock=lock)
    assert removed == temps
    assert sorted(q.name for q in out.iterdir()) == [LOCK_NAME, "checkpoint.pt"]


def test_clean_stale_temps_touches_only_temp_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pt", ".lock", "x.tmp", ".tmp", ".a.json.abc.tmp"):
        (out / name).write_text("x")
    (out / ".dir.tmp").mkdir()
    (out / ".link.tmp").symlink_to(out / "checkpoint.pt")
    with pytest.raises(RunFolderError, match="RunLock held"):
        clean_stale_temps(out, lock=RunLock(out))            # not acquired
    removed = clean_stale_temps(out)
    assert [q.name for q in removed] == [".a.json.abc.tmp"]
    assert (out / ".link.tmp").is_symlink()          # atomic_open never makes links: left alone
    assert (out / "checkpoint.pt").exists() and (out / "x.tmp").exists()
    assert (out / ".dir.tmp").is_dir() and (out / ".tmp").exists()


# ---- writability -----------------------------------------------------------------------------------
def test_out_pointing_at_a_file_or_below_one(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunFolderNotWritable, match="is a file, not a folder"):
        check_writable(f)
    with pytest.raises(RunFolderNotWritable, match=f"is below {f}, which is a file"):
        check_writable(f / "sub" / "run")
    with pytest.raises(RunFolderNotWritable):
        RunLock(f).acquire()


def test_folder_the_process_may_not_write(tmp_path, monkeypatch):
    """/sys refuses new entries even to root (a real EACCES/EPERM, not a simulation)."""
    if os.path.isdir("/sys/kernel"):
        with pytest.raises(RunFolderNotWritable, match="cannot create the output folder"):
            check_writable("/sys/kernel/splatdd-run")
    # a read-only file system, simulated at the probe write (root ignores permission bits)
    real_open = os.open

    def ro_open(path, flags, *a):
        if str(path).startswith(str(tmp_path / "ro")) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a)
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "open", ro_open)
    with pytest.raises(RunFolderNotWritable, match=r"not writable: read-only file system "
                                                   r"\(EROFS\)"):
        check_writable(tmp_path / "ro")
    monkeypatch.undo()
    assert check_writable(tmp_path / "ok" / "nested") == tmp_path / "ok" / "nested"
    assert list((tmp_path / "ok" / "nested").iterdir()) == []           # the probe is removed


# ---- write failures --------------------------------------------------------------------------------
@pytest.mark.parametrize("code,text", [(errno.ENOSPC, "no space left on device (ENOSPC)"),
                                       (errno.EROFS, "read-only file system (EROFS)"),
                                       (errno.EACCES, "permission denied (EACCES)")])
def test_translate_write_errors(code, text):
    with pytest.raises(WriteFailed) as e:
        with translate_write_errors("checkpoint x.pt", kept="the previous checkpoint (step 4)",
                                    hint="rerun with --resume"):
            raise OSError(code, os.strerror(code))
    assert str(e.value) == (f"cannot write checkpoint x.pt: {text}; kept: the previous checkpoint "
                            f"(step 4); rerun with --resume")
    assert e.value.__cause__.errno == code


def test_translate_write_errors_passes_other_errors():
    with pytest.raises(FileNotFoundError):
        with translate_write_errors("x"):
            raise FileNotFoundError(errno.ENOENT, "gone")
    with pytest.raises(RuntimeError, match="unrelated"):
        with translate_write_errors("x"):
            raise RuntimeError("unrelated")
    with translate_write_errors("x"):
        pass


class _FullDisk:
    """A file object that accepts ``room`` bytes and then fails like a full disk."""

    def __init__(self, f, room: int):
        self._f, self.room = f, room

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self._f.write(b)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


@pytest.mark.parametrize("room", [0, 100, 2000])
def test_disk_full_under_torch_save_is_translated_and_keeps_the_old_file(tmp_path, monkeypatch,
                                                                         room):
    ckpt = tmp_path / "checkpoint.pt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, ckpt)
    before = ckpt.read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr(io_utils.os, "fdopen", lambda fd, mode: _FullDisk(real_fdopen(fd, mode),
                                                                          room))
    with pytest.raises(WriteFailed, match="kept: the previous checkpoint") as e:
        with translate_write_errors(f"checkpoint {ckpt}", kept="the previous checkpoint"):
            atomic_torch_save({"step": 2, "w": torch.zeros(10_000)}, ckpt)
    assert "disk full?" in str(e.value) or "ENOSPC" in str(e.value)
    monkeypatch.undo()
    assert ckpt.read_bytes() == before
    assert sorted(q.name for q in tmp_path.iterdir()) == ["checkpoint.pt"]    # no temp left
