"""Robustness sweep: bad inputs of every kind against the distilled-file loader, the run folder and
the distillation loop's checkpoints; counts clean errors, crashes (any other exception: a traceback
for the user), hangs and silently accepted changes. Target: 0 crashes, 0 hangs, 0 silent changes.

Categories:

* the hostile-file corpus of splatdd/testing_hostile.py (corrupted bytes, truncations, metadata and
  tensor edits with and without recomputed digests, hostile sizes, FIFO/sparse/special files),
  through ``distilled_file.load`` and through the CLI (``splatdd export``, in-process);
* random byte mutations of a valid file (seeded): a clean error or an unchanged decode;
* concurrent writers: two processes racing for one run folder's lock;
* kill -9 of a distillation at several moments (between steps, in the middle of a checkpoint,
  history or distilled-file write), then a restart that takes the lock, cleans stale temporary
  files and resumes: the final file must equal an uninterrupted run's bit for bit;
* disk full (ENOSPC simulated at each write of a run, at 0 bytes and part-way), then a resume;
* read-only and unusable output folders;
* the entry points (do ``splatdd.experiment.run``, which the CLI calls, and ``distill`` take the
  lock, clean stale temps, check writability first): these probes pass once splatdd.run_folder
  is wired into them.

It also copies the renderer's thin-Gaussian result from benchmarks/results/render_thin.json.

    python benchmarks/robustness.py          # writes benchmarks/results/robustness.{md,json}
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
TIMEOUT = 60.0
#: A child's start (python + torch import) and first steps on a loaded 2-core machine.
CHILD_TIMEOUT = 180.0


def _corpus_module():
    from splatdd import testing_hostile
    return testing_hostile


# ---- a tiny distillation, shared by the in-process runs and the child processes ------------------
ITERATIONS, EVERY = 8, 2


def run_distill(out: Path, *, resume: bool, on_step: Callable | None = None) -> None:
    """The tiny run (TinyPixels + a toy objective, 8 steps, checkpoints every 2), as the next
    start of a run does it: ``distill`` takes the run folder's lock, cleans stale temps and
    resumes."""
    from splatdd import distill as D
    from splatdd.testing import TINY_SPEC, TinyPixels, ToyProjection, make_tiny_real

    torch.set_num_threads(1)
    p = TinyPixels.build(TINY_SPEC, 1, generator=torch.Generator().manual_seed(1))
    a = ToyProjection(make_tiny_real(8), ipc=1, generator=torch.Generator().manual_seed(0))
    D.distill(p, a, iterations=ITERATIONS, out_dir=out, progress=False, plot=False, seed=0,
              resume=resume, checkpoint_every=EVERY, on_step=on_step, registry=_registry())


def _registry():
    from splatdd.registry import Registry
    from splatdd.testing import TinyPixels
    reg = Registry(entry_points=False)
    reg.register("parameterization", TinyPixels)
    return reg


def _final_images(out: Path) -> torch.Tensor:
    from splatdd import distilled_file as F
    return F.load(out / "distilled.safetensors", registry=_registry()).images()


def _child(out: str, kill_after_step: int, stall_write: int) -> None:
    """Child mode: print every step; stall (sleep) in the middle of atomic write #stall_write
    after writing part of it, so the parent can kill -9 it there."""
    from splatdd import io_utils
    count = {"n": 0}
    real_fdopen = os.fdopen

    def fdopen(fd, mode):
        f = real_fdopen(fd, mode)
        count["n"] += 1
        if count["n"] == stall_write:
            real_write = f.write

            def write(b):
                n = real_write(bytes(b)[:max(1, len(b) // 2)])
                f.flush()
                print("midwrite", flush=True)
                time.sleep(600)
                return n
            f.write = write
        return f
    io_utils.os.fdopen = fdopen

    def on_step(step, loss, param, algo):
        print(f"step {step}", flush=True)
        if step == kill_after_step:
            time.sleep(600)
    run_distill(Path(out), resume=True, on_step=on_step)
    print("done", flush=True)


# ---- helpers -----------------------------------------------------------------------------------------
class Tally:
    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def add(self, category: str, outcome: str, what: str, detail: str = "") -> None:
        row = self.rows.setdefault(category, {"tried": 0, "clean": 0, "unchanged": 0, "crash": 0,
                                              "hang": 0, "silent": 0, "failures": []})
        row["tried"] += 1
        row[outcome] += 1
        if outcome not in ("clean", "unchanged"):
            row["failures"].append(f"{what}: {outcome}: {detail}"[:300])


def _in_thread(fn: Callable[[], Any], timeout: float = TIMEOUT) -> tuple[str, Any]:
    """('ok', value) | ('error', exception) | ('hang', None)."""
    box: dict[str, Any] = {}

    def run():
        try:
            box["ok"] = fn()
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return "hang", None
    return ("error", box["error"]) if "error" in box else ("ok", box.get("ok"))


def _readline(proc: subprocess.Popen, timeout: float) -> str | None:
    """The child's next stdout line ('' at its end), or None after ``timeout`` s.

    A thread reads the pipe: select() on the file descriptor would miss lines that the text
    wrapper already buffered (two lines arriving together), and wait out the timeout."""
    import queue
    import threading
    q = getattr(proc, "_lines", None)
    if q is None:
        q = proc._lines = queue.Queue()  # type: ignore[attr-defined]

        def pump() -> None:
            for line in proc.stdout:
                q.put(line.strip())
            q.put("")
        threading.Thread(target=pump, daemon=True).start()
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        return None


def _remove_inside(p: Path, tmp: Path) -> None:
    """Remove a corpus file, but only inside ``tmp`` (a case may point at /dev/zero)."""
    if not str(p.absolute()).startswith(str(tmp.absolute()) + os.sep):
        return
    with contextlib.suppress(OSError):
        p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()


# ---- categories ----------------------------------------------------------------------------------
CORPUS_CATEGORY = {"corrupted": "corrupted files", "truncated": "truncations",
                   "metadata": "metadata edits", "tensors": "tensor edits",
                   "sizes": "hostile sizes", "special": "FIFO / sparse / special files"}


def corpus(tally: Tally, tmp: Path) -> None:
    from splatdd import distilled_file as F
    H = _corpus_module()
    for case in H.corpus():
        reg = H.registry()
        path = case.make(H.valid_file(tmp / f"{case.id}.safetensors", reg=reg))
        status, val = _in_thread(lambda: F.load(path, registry=reg))
        cat = CORPUS_CATEGORY[case.category]
        if status == "hang":
            tally.add(cat, "hang", case.id)
        elif status == "ok":
            tally.add(cat, "silent", case.id, "accepted")
        elif isinstance(val, F.DistilledFileError) and re.search(case.field, str(val)):
            tally.add(cat, "clean", case.id)
        else:
            tally.add(cat, "crash", case.id, f"{type(val).__name__}: {val}")
        for p in (path, path.with_name(path.name + ".fifo")):
            _remove_inside(p, tmp)


def corpus_cli(tally: Tally, tmp: Path) -> None:
    """The same corpus through ``splatdd export`` (in-process, the test plugin registered)."""
    from splatdd import cli
    H = _corpus_module()
    real_registry = cli._registry
    cli._registry = H.registry
    try:
        for case in H.corpus():
            path = case.make(H.valid_file(tmp / f"cli-{case.id}.safetensors"))
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                status, val = _in_thread(lambda: cli.main(["export", str(path), "--out",
                                                           str(tmp / "x.pt")]))
            if status == "hang":
                tally.add("CLI (splatdd export) on the corpus", "hang", case.id)
            elif status == "ok" and val == 2 and err.getvalue().startswith("splatdd: error: "):
                tally.add("CLI (splatdd export) on the corpus", "clean", case.id)
            elif status == "ok" and val == 0:
                tally.add("CLI (splatdd export) on the corpus", "silent", case.id, "exit 0")
            else:
                tally.add("CLI (splatdd export) on the corpus", "crash", case.id,
                          f"{status} {type(val).__name__}: {val} {err.getvalue()[-200:]}")
            for p in (path, path.with_name(path.name + ".fifo")):
                _remove_inside(p, tmp)
    finally:
        cli._registry = real_registry


def fuzz(tally: Tally, tmp: Path, n: int) -> None:
    from splatdd import distilled_file as F
    H = _corpus_module()
    reg = H.registry()
    valid = H.valid_file(tmp / "fuzz-valid.safetensors", reg=reg)
    buf = valid.read_bytes()
    ref = F.load(valid, registry=reg)
    ref_meta = json.dumps(ref.meta, sort_keys=True)
    hs = H.data_start(buf)
    rng = random.Random(0)
    path = tmp / "fuzz.safetensors"
    for k in range(n):
        b = bytearray(buf)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(hs) if rng.random() < 0.5 else rng.randrange(len(b))
            b[i] = rng.randrange(256)
        path.write_bytes(bytes(b))
        status, val = _in_thread(lambda: F.load(path, registry=reg))
        what = f"mutation #{k}"
        if status == "hang":
            tally.add("random byte mutations", "hang", what)
        elif status == "error":
            ok = isinstance(val, F.DistilledFileError)
            tally.add("random byte mutations", "clean" if ok else "crash", what,
                      f"{type(val).__name__}: {val}")
        elif (torch.equal(val.images(), ref.images()) and torch.equal(val.labels, ref.labels)
              and json.dumps(val.meta, sort_keys=True) == ref_meta):
            tally.add("random byte mutations", "unchanged", what)
        else:
            tally.add("random byte mutations", "silent", what, "decoded differently")


def gaussian_reproducer(tally: Tally, tmp: Path, notes: dict) -> None:
    """The issue's 33 KB gaussian file whose config says points=500000 (5.3 GB before)."""
    from splatdd import distilled_file as F
    from splatdd.plugin_api import DatasetSpec
    from splatdd.registry import Registry, default_registry
    H = _corpus_module()
    try:
        cls = default_registry().get_parameterization("gaussian")
    except Exception as exc:  # noqa: BLE001
        notes["gaussian_points_500000"] = f"not run: gaussian plugin unavailable ({exc})"
        return
    spec = DatasetSpec("fashion_mnist", 1, 28, 28, 10, mean=(0.2861,), std=(0.353,))
    reg = Registry(entry_points=False)
    reg.register("parameterization", cls)
    p = cls.build(spec, 1, generator=torch.Generator().manual_seed(0))
    path = F.save(tmp / "g.safetensors", p, spec=spec, ipc=1, registry=reg)
    size = path.stat().st_size
    H.rewrite(path, meta=lambda j: j["parameterization"]["config"].update(points=500000))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    status, val = _in_thread(lambda: F.load(path, registry=reg))
    dt = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ok = status == "error" and isinstance(val, F.InvalidTensorData)
    tally.add("hostile sizes", "clean" if ok else ("hang" if status == "hang" else "crash"),
              "gaussian points=500000", f"{status} {val}")
    notes["gaussian_points_500000"] = (f"{size:,}-byte gaussian file with points=500000: refused in "
                                       f"{dt:.2f} s, peak RSS grew by {(rss1 - rss0) / 1024:.0f} MB "
                                       f"({type(val).__name__})")


def concurrent(tally: Tally, tmp: Path, trials: int) -> None:
    rf_path = ROOT / "src" / "splatdd" / "run_folder.py"
    for k in range(trials):
        out, go, done = tmp / f"race{k}", tmp / f"go{k}", tmp / f"done{k}"
        code = f"""
import importlib.util, os, time
spec = importlib.util.spec_from_file_location("run_folder", {str(rf_path)!r})
rf = importlib.util.module_from_spec(spec); spec.loader.exec_module(rf)
print("ready", flush=True)
while not os.path.exists({str(go)!r}): time.sleep(0.0005)
try:
    with rf.RunLock({str(out)!r}):
        print("won", os.getpid(), flush=True)
        while not os.path.exists({str(done)!r}): time.sleep(0.001)
except rf.RunFolderBusy as e:
    print("busy", e.pid, flush=True)
"""
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        ready = [_readline(p, TIMEOUT) for p in procs]
        go.touch()
        lines = [(_readline(p, TIMEOUT) or "").split() for p in procs] if ready == [
            "ready", "ready"] else [[], []]
        done.touch()
        for p in procs:
            try:
                p.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                p.kill()
        kinds = sorted(x[0] for x in lines if x)
        what = f"race #{k}"
        if len(kinds) < 2:
            tally.add("concurrent writers", "hang", what, str(lines))
        elif kinds == ["busy", "won"]:
            won = next(x for x in lines if x[0] == "won")
            busy = next(x for x in lines if x[0] == "busy")
            tally.add("concurrent writers", "clean" if busy[1] == won[1] else "crash", what,
                      f"refusal named PID {busy[1]}, holder {won[1]}")
        elif kinds == ["won", "won"]:
            tally.add("concurrent writers", "silent", what, "both took the lock")
        else:
            tally.add("concurrent writers", "crash", what, str(lines))


def kills(tally: Tally, tmp: Path, reference: torch.Tensor) -> None:
    """kill -9 at several moments, restart (lock, clean temps, resume), compare with the
    uninterrupted run. Atomic writes of the run, in order: checkpoints at steps 2, 4, 6, 8
    (#1-#4), history.json (#5), distilled.safetensors (#6)."""
    moments = [("after step 1", 1, 0), ("after step 3", 3, 0), ("after step 6", 6, 0),
               ("mid-write of checkpoint step 2", 0, 1), ("mid-write of checkpoint step 6", 0, 3),
               ("mid-write of the final checkpoint", 0, 4), ("mid-write of history.json", 0, 5),
               ("mid-write of distilled.safetensors", 0, 6)]
    for what, after, stall in moments:
        out = tmp / f"kill-{after}-{stall}"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(out),
               "--kill-after-step", str(after), "--stall-write", str(stall)]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        target = f"step {after}" if after else "midwrite"
        seen = False
        while True:
            line = _readline(p, CHILD_TIMEOUT)
            if line is None or line == "" or line == "done":
                break
            if line == target:
                seen = True
                break
        if not seen:
            p.kill()
            tally.add("kill -9 at several moments", "hang" if line is None else "crash", what,
                      f"child never reached the moment (last line {line!r}): "
                      f"{p.stderr.read()[-300:]}")
            continue
        p.send_signal(signal.SIGKILL)
        p.wait(TIMEOUT)
        stale = [q.name for q in out.iterdir() if q.name.endswith(".tmp")]
        try:                                   # the next start, in this process
            run_distill(out, resume=True)
        except BaseException as exc:  # noqa: BLE001
            tally.add("kill -9 at several moments", "crash", what, f"{type(exc).__name__}: {exc}")
            continue
        left = [x.name for x in out.iterdir() if x.name.endswith(".tmp")]
        if left:
            tally.add("kill -9 at several moments", "crash", what, f"temps left: {left}")
        elif torch.equal(_final_images(out), reference):
            tally.add("kill -9 at several moments", "clean", what,
                      f"stale temps cleaned on restart: {stale}")
        else:
            tally.add("kill -9 at several moments", "silent", what, "resumed result differs")


def disk_full(tally: Tally, tmp: Path, reference: torch.Tensor) -> None:
    """ENOSPC at atomic write #k of the run (0 bytes written, or after 100 bytes), then resume."""
    from splatdd import io_utils
    from splatdd.run_folder import RunFolderError
    real_fdopen = os.fdopen
    names = {1: "checkpoint step 2", 2: "checkpoint step 4", 4: "final checkpoint",
             5: "history.json", 6: "distilled.safetensors"}
    for k, name in names.items():
        for room in (0, 100):
            out = tmp / f"full-{k}-{room}"
            count = {"n": 0}

            def fdopen(fd, mode, k=k, room=room, count=count):
                f = real_fdopen(fd, mode)
                count["n"] += 1
                if count["n"] == k:
                    left = {"room": room}
                    real_write = f.write

                    def write(b):
                        if len(b) > left["room"]:
                            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                        left["room"] -= len(b)
                        return real_write(b)
                    f.write = write
                return f
            what = f"ENOSPC at {name} after {room} bytes"
            io_utils.os.fdopen = fdopen
            try:
                run_distill(out, resume=False)
                err: BaseException | None = None
            except BaseException as exc:  # noqa: BLE001
                err = exc
            finally:
                io_utils.os.fdopen = real_fdopen
            if err is None:
                tally.add("disk full (simulated ENOSPC)", "silent", what, "the run reported success")
                continue
            if not isinstance(err, RunFolderError):
                tally.add("disk full (simulated ENOSPC)", "crash", what,
                          f"{type(err).__name__}: {err}")
                continue
            try:
                run_distill(out, resume=True)
                same = torch.equal(_final_images(out), reference)
            except BaseException as exc:  # noqa: BLE001
                tally.add("disk full (simulated ENOSPC)", "crash", what,
                          f"resume failed: {type(exc).__name__}: {exc}")
                continue
            tally.add("disk full (simulated ENOSPC)", "clean" if same else "silent", what,
                      "" if same else "resumed result differs")


def read_only(tally: Tally, tmp: Path) -> None:
    from splatdd.run_folder import (RunFolderError, RunFolderNotWritable, RunLock,
                                    check_writable)
    f = tmp / "a-file"
    f.write_text("x")
    real_open = os.open

    def erofs(path, flags, *a):
        if "ro-dir" in str(path) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a)

    def eacces(path, flags, *a):
        if "ro-dir" in str(path) and flags & os.O_CREAT:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *a)
    (tmp / "ro-dir").mkdir()
    cases: list[tuple[str, Callable[[], Any], Callable | None]] = [
        ("--out is a file", lambda: check_writable(f), None),
        ("--out below a file", lambda: check_writable(f / "run"), None),
        ("--out under /sys (EACCES even for root)", lambda: check_writable("/sys/kernel/x/run"),
         None),
        ("read-only file system (EROFS, simulated)", lambda: check_writable(tmp / "ro-dir"), erofs),
        ("permission denied (EACCES, simulated)", lambda: check_writable(tmp / "ro-dir"), eacces),
        ("lock in a file's place", lambda: RunLock(f).acquire(), None),
        ("distill run on an EROFS folder", lambda: run_distill(tmp / "ro-dir" / "r", resume=False),
         erofs),
    ]
    for what, fn, patch in cases:
        if patch is not None:
            os.open = patch
        try:
            fn()
            tally.add("read-only / unusable folders", "silent", what, "accepted")
        except (RunFolderNotWritable, RunFolderError) as exc:
            tally.add("read-only / unusable folders", "clean", what, str(exc))
        except BaseException as exc:  # noqa: BLE001
            tally.add("read-only / unusable folders", "crash", what, f"{type(exc).__name__}: {exc}")
        finally:
            os.open = real_open


def experiment_entry(tally: Tally, tmp: Path) -> None:
    """Does ``splatdd.experiment.run`` (what the CLI calls) use the run-folder safety? The config
    points at a dataset folder that does not exist, so a run that gets past the folder checks
    stops at loading the data, before any training."""
    from splatdd.run_folder import RunFolderError, RunLock
    cat = "experiment.run() entry point"
    try:
        from splatdd.experiment import ConfigError, DatasetConfig, ExperimentConfig, run
    except ImportError as exc:
        tally.add(cat, "crash", "import splatdd.experiment", repr(exc))
        return

    def go(out: Path):
        cfg = ExperimentConfig(out=str(out), dataset=DatasetConfig(root=str(tmp / "no-data")))
        return run(cfg, progress=False, log=lambda msg: None)

    def probe(what: str, out: Path, want: type, check: Callable[[], str] = lambda: "") -> None:
        try:
            go(out)
            tally.add(cat, "silent", what, "the run went on")
        except want:
            bad = check()
            tally.add(cat, "silent" if bad else "clean", what, bad)
        except (RunFolderError, ConfigError) as exc:
            tally.add(cat, "silent", what, f"not refused at the folder: {exc}"[:200])
        except BaseException as exc:  # noqa: BLE001
            tally.add(cat, "crash", what, f"{type(exc).__name__}: {exc}")

    out = tmp / "exp-lock"
    with RunLock(out):
        probe("second writer while the folder is locked", out, RunFolderError)
    out = tmp / "exp-temp"
    out.mkdir()
    temp = out / ".checkpoint.pt.stale.tmp"
    temp.write_bytes(b"")
    probe("stale temp file at start", out, ConfigError,
          lambda: "not removed" if temp.exists() else "")
    f = tmp / "exp-file"
    f.write_text("x")
    probe("--out is a file", f, RunFolderError)


def integration(tally: Tally, tmp: Path) -> None:
    """Does ``splatdd.distill.distill`` itself use the run-folder safety?"""
    from splatdd.run_folder import RunFolderError, RunLock
    cat = "distill() entry point"
    out = tmp / "int-lock"
    with RunLock(out):
        try:
            run_distill(out, resume=False)
            tally.add(cat, "silent", "second writer while the folder is locked",
                      "distill ran although another writer holds the lock")
        except RunFolderError:
            tally.add(cat, "clean", "second writer while the folder is locked")
        except BaseException as exc:  # noqa: BLE001
            tally.add(cat, "crash", "second writer while the folder is locked", repr(exc))
    out = tmp / "int-temp"
    out.mkdir()
    (out / ".checkpoint.pt.stale.tmp").write_bytes(b"")
    run_distill(out, resume=True)
    left = (out / ".checkpoint.pt.stale.tmp").exists()
    tally.add(cat, "silent" if left else "clean", "stale temp file at start",
              "not removed" if left else "")
    f = tmp / "int-file"
    f.write_text("x")
    try:
        run_distill(f, resume=False)
        tally.add(cat, "silent", "--out is a file", "accepted")
    except RunFolderError:
        tally.add(cat, "clean", "--out is a file")
    except BaseException as exc:  # noqa: BLE001
        tally.add(cat, "crash", "--out is a file", f"{type(exc).__name__}: {exc}")


def renderer_line() -> tuple[str, dict | None]:
    path = RESULTS / "render_thin.json"
    if not path.is_file():
        return (f"renderer: {path.relative_to(ROOT)} is not there yet (written by the renderer's "
                f"thin-Gaussian sweep); rerun this script after it", None)
    try:
        d = json.loads(path.read_text())
        line = (f"renderer, thin-Gaussian sweep ({d['cases']} cases, from "
                f"`{path.relative_to(ROOT)}`): worst |fp32 - fp64| = {d['fp32_max_abs_err']:.3g} "
                f"(documented bound {d['bound_fp32']:.3g}), worst |bf16 - fp64| = "
                f"{d['bf16_max_abs_err']:.3g} (bound {d['bound_bf16']:.3g}); within the bounds: "
                f"{d['fp32_max_abs_err'] <= d['bound_fp32'] and d['bf16_max_abs_err'] <= d['bound_bf16']}")
        return line, {k: d[k] for k in ("cases", "fp32_max_abs_err", "bf16_max_abs_err",
                                        "bound_fp32", "bound_bf16")}
    except (ValueError, KeyError, TypeError) as exc:
        return f"renderer: cannot read {path.relative_to(ROOT)}: {exc!r}", None


# ---- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--kill-after-step", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--stall-write", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--mutations", type=int, default=2000, help="random byte mutations (2000)")
    ap.add_argument("--races", type=int, default=10, help="two-process lock races (10)")
    ap.add_argument("--out", default=str(RESULTS / "robustness.md"))
    ap.add_argument("--update-renderer", action="store_true",
                    help="only re-read render_thin.json and rewrite the report from the .json")
    args = ap.parse_args(argv)
    if args.update_renderer:
        write_report(json.loads(Path(args.out).with_suffix(".json").read_text()), Path(args.out))
        return 0
    if args.child:
        _child(args.child, args.kill_after_step, args.stall_write)
        return 0

    from splatdd.fit import machine_description
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    tally = Tally()
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="splatdd-robust-") as d:
        tmp = Path(d)
        ref_dir = tmp / "reference"
        run_distill(ref_dir, resume=False)
        reference = _final_images(ref_dir)
        steps = [("corpus", lambda: corpus(tally, tmp / "c")),
                 ("gaussian", lambda: gaussian_reproducer(tally, tmp / "g", notes)),
                 ("cli", lambda: corpus_cli(tally, tmp / "cli")),
                 ("fuzz", lambda: fuzz(tally, tmp / "f", args.mutations)),
                 ("races", lambda: concurrent(tally, tmp / "r", args.races)),
                 ("kills", lambda: kills(tally, tmp / "k", reference)),
                 ("disk full", lambda: disk_full(tally, tmp / "d", reference)),
                 ("read-only", lambda: read_only(tally, tmp / "ro")),
                 ("experiment.run", lambda: experiment_entry(tally, tmp / "e")),
                 ("distill", lambda: integration(tally, tmp / "i"))]
        for sub in ("c", "g", "cli", "f", "r", "k", "d", "ro", "e", "i"):
            (tmp / sub).mkdir()
        for name, fn in steps:
            t = time.perf_counter()
            fn()
            print(f"{name}: {time.perf_counter() - t:.1f} s", flush=True)
    seconds = time.perf_counter() - t0
    load1 = os.getloadavg()
    totals = {k: sum(r[k] for r in tally.rows.values())
              for k in ("tried", "clean", "unchanged", "crash", "hang", "silent")}
    data = {"categories": tally.rows, "totals": totals, "notes": notes,
            "machine": machine_description(), "loadavg_start": load0, "loadavg_end": load1,
            "seconds": seconds, "torch_threads": 1}
    write_report(data, Path(args.out))
    return 0


def write_report(data: dict[str, Any], out: Path) -> None:
    """robustness.json and .md from the sweep's ``data`` (the renderer line read afresh)."""
    from splatdd.io_utils import atomic_write_json, atomic_write_text
    render, render_json = renderer_line()
    data = {**data, "renderer": render_json, "renderer_line": render}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), data)
    rows, totals = data["categories"], data["totals"]
    lines = ["# Robustness: bad inputs against the file loader, run folder and checkpoints", "",
             f"Generated by `python benchmarks/robustness.py` in {data['seconds']:.0f} s on: "
             f"{data['machine']}; torch threads {data['torch_threads']} in this process; load "
             f"average {data['loadavg_start'][0]:.1f} at the start, {data['loadavg_end'][0]:.1f} "
             f"at the end (2 shared cores). Target: 0 crashes, 0 hangs, 0 silent changes.", "",
             "A *clean error* is a splatdd exception whose message names the field, file or "
             "folder (the CLI prints it as `splatdd: error: ...`, exit 2); *unchanged* is a "
             "mutated file that decodes exactly like the original (e.g. a byte of the header's "
             "whitespace padding); a *crash* is any other exception (a traceback for the user); "
             f"a *hang* is no answer within {TIMEOUT:.0f} s; a *silent change* is a bad input "
             "accepted, or a resumed run that differs from an uninterrupted one.", "",
             "| category | tried | clean errors | unchanged | crashes | hangs | silent changes |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for cat, r in rows.items():
        lines.append(f"| {cat} | {r['tried']} | {r['clean']} | {r['unchanged']} | {r['crash']} | "
                     f"{r['hang']} | {r['silent']} |")
    lines.append(f"| **total** | {totals['tried']} | {totals['clean']} | {totals['unchanged']} | "
                 f"{totals['crash']} | {totals['hang']} | {totals['silent']} |")
    lines += ["", f"- {render}"]
    lines += [f"- {v}" for v in data["notes"].values()]
    fails = [(cat, f) for cat, r in rows.items() for f in r["failures"]]
    lines += ["", "## Failures", ""]
    lines += [f"- {cat}: {f}" for cat, f in fails] or ["None."]
    lines += ["", "Kill -9 moments: the child is killed between steps or while an atomic write is "
              "half done (it stalls there); the restart takes the run lock, removes the stale "
              "`.*.tmp` files and resumes; the final distilled file must equal an uninterrupted "
              "run's. Disk full: ENOSPC raised by the file object at the given write of a run (0 "
              "bytes or 100 bytes in), then a resume. Read-only folders: `/sys` is a real "
              "non-writable folder (even for root); EROFS/EACCES are simulated at `open` (no "
              "read-only mount is available to an unprivileged test). The corpus is "
              "`splatdd/testing_hostile.py`; the same cases run as tests in "
              "`tests/test_hostile_files.py`. `--update-renderer` rewrites this report from "
              "robustness.json with a fresh renderer line, without rerunning the sweep.", ""]
    atomic_write_text(out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
