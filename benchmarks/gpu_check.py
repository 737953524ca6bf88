"""One-shot GPU validation of the CUDA backend (issue 17), run by scripts/gpu_check.sh.

Steps, each time-boxed (coreutils ``timeout``), logged to ``RESULTS_DIR/logs/<step>.log``, and run
whatever the earlier ones gave:

1. ``env``: GPU, driver, nvcc, compute-sanitizer, torch, Python and the Python modules the build and
   the tests need (scikit-build-core, pybind11, pytest, hypothesis); what is missing is named.
2. ``build``: ``pip install --no-index --no-build-isolation --no-deps -e .`` with ``SPLATDD_CUDA=ON``
   and ``CMAKE_CUDA_ARCHITECTURES=native`` (nothing is downloaded), then checks that
   ``splatdd.backends()`` lists ``cuda``.
3. ``tests``: pytest on ``tests/test_render_*.py`` (test_render_cuda.py included), without ``-x``,
   junit xml in ``logs/``; fails when the CUDA tests were skipped.
4. ``memcheck`` / ``racecheck``: compute-sanitizer over benchmarks/gpu_sanitize_case.py (memcheck
   with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` and ``--leak-check full``).
5. ``render_benchmark``: benchmarks/render_gpu.py (CUDA backend vs dense reference on the GPU vs the
   CPU backend, the CPU benchmark's workloads); ``table20``: benchmarks/table20.py (the GSDD
   Table 20 fitting task) within the time left.
6. ``RESULTS_DIR/render_cuda.md`` and ``render_cuda.json`` with every figure, and a one-screen
   summary on stdout.

``--dry-run`` (or a machine where torch sees no GPU) marks every step that needs a GPU
"skipped: no GPU" and still writes the summary, the md and the json. The whole run keeps to
``--budget-s`` (default 420 s): each step's time box is cut so that the later steps keep their
minimum.

    python benchmarks/gpu_check.py benchmarks/results            # on the GPU machine
    python benchmarks/gpu_check.py /tmp/gc --dry-run              # anywhere
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SKIP_NO_GPU = "skipped: no GPU"
#: Python modules the steps need, and what for
NEEDED_MODULES = {"scikit_build_core": "build", "pybind11": "build", "pytest": "tests",
                  "hypothesis": "tests (test_render_reference.py)", "numpy": "tests"}
#: (step, needs a GPU, longest time box s, minimum kept for it s)
STEPS = (
    ("env", False, 60, 10),
    ("build", True, 240, 60),
    ("tests", True, 150, 30),
    ("memcheck", True, 100, 30),
    ("racecheck", True, 100, 30),
    ("render_benchmark", True, 90, 30),
    ("table20", True, 240, 45),
)
REPORT_RESERVE_S = 10.0
SANITIZER_CASE = "benchmarks/gpu_sanitize_case.py"


@dataclass
class StepResult:
    """What one step did. ``status``: ``ok``, ``failed``, ``timeout``, ``unsupported`` (the
    tool cannot run on this machine), ``skipped: <why>``, or ``pending`` (not reached yet: in the
    partial report written between steps)."""

    name: str
    status: str
    seconds: float = 0.0
    timeout_s: float | None = None
    command: str | None = None
    log: str | None = None
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)


# ---- parsing -------------------------------------------------------------------------------------
def parse_nvidia_smi(text: str) -> list[dict[str, str]]:
    """Rows of ``nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader``.

    >>> parse_nvidia_smi("NVIDIA H200, 580.159.03, 143771 MiB\\n")
    [{'name': 'NVIDIA H200', 'driver': '580.159.03', 'memory': '143771 MiB'}]
    """
    rows = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3 and parts[0]:
            rows.append({"name": parts[0], "driver": parts[1], "memory": parts[2]})
    return rows


def parse_nvcc_version(text: str) -> str | None:
    """The release of ``nvcc --version`` output ("13.0"), or None.

    >>> parse_nvcc_version("Cuda compilation tools, release 13.0, V13.0.48")
    '13.0'
    """
    m = re.search(r"release (\d+\.\d+)", text)
    return m.group(1) if m else None


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts (tests, passed, failed, errors, skipped), the same per file, and the failing tests
    (``file::name: first line of the message``) of a pytest junit xml file."""
    root = ET.parse(path).getroot()
    totals = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    per_file: dict[str, dict[str, int]] = {}
    failures = []
    for case in root.iter("testcase"):
        cls = case.get("classname", "")
        fname = cls.split(".")[0] + ".py" if cls else "?"
        for part in cls.split("."):
            if part.startswith("test_"):
                fname = part + ".py"
                break
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}[child.tag]
                if child.tag != "skipped":
                    msg = (child.get("message") or child.text or "").strip().splitlines()
                    failures.append(f"{fname}::{case.get('name')}: {msg[0][:200] if msg else child.tag}")
                break
        for d in (totals, per_file.setdefault(fname, {k: 0 for k in totals})):
            d["tests"] += 1
            d[outcome] += 1
    return {**totals, "per_file": per_file, "failures": failures}


_OURS = re.compile(r"splatdd|render_fwd|render_bwd|binning|preprocess_kernel|emit_kernel|ranges_kernel|finish_kernel")


def parse_sanitizer(text: str) -> dict[str, Any]:
    """compute-sanitizer output -> error count, racecheck hazards, leaks, the distinct report
    headers (first 10), how many report lines name splatdd's code, and whether the tool refused
    the device (``unsupported``).

    >>> parse_sanitizer("========= ERROR SUMMARY: 0 errors\\n")["errors"]
    0
    """
    lines = [ln for ln in text.splitlines() if ln.startswith("=========")]
    m = re.search(r"ERROR SUMMARY: (\d+) errors?", text)
    r = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    leak = re.search(r"LEAK SUMMARY: (\d+) bytes leaked in (\d+) allocations?", text)
    heads: list[str] = []
    for ln in lines:
        body = ln.lstrip("= ").strip()
        if re.match(r"(Invalid |Error|Warning|Program hit|Leaked |Uninitialized |Barrier )", body):
            key = re.sub(r"0x[0-9a-f]+", "0x..", body)[:160]
            if key not in heads:
                heads.append(key)
    unsupported = bool(re.search(r"Device not supported|not supported on this (device|platform)|"
                                 r"Target application terminated before first instrumented API call",
                                 text))
    # racecheck ends with its RACECHECK SUMMARY alone (seen on the first H200 run, compute-sanitizer
    # of CUDA 13): its error count is then the verdict. memcheck counts each leaked allocation of
    # --leak-check full as one error: the rest are access errors.
    errors = int(m.group(1)) if m else (int(r.group(2)) if r else None)
    n_leaks = sum(1 for ln in lines if ln.lstrip("= ").startswith("Leaked "))
    return {"errors": errors,
            "access_errors": None if errors is None else max(errors - n_leaks, 0),
            "hazards": int(r.group(1)) if r else None,
            "race_errors": int(r.group(2)) if r else None,
            "race_warnings": int(r.group(3)) if r else None,
            "leaked_bytes": int(leak.group(1)) if leak else 0,
            "leaked_allocations": int(leak.group(2)) if leak else 0,
            "reports": heads[:10],
            "lines_naming_splatdd": sum(1 for ln in lines if _OURS.search(ln)),
            "unsupported": unsupported}


# ---- running -------------------------------------------------------------------------------------
def run_logged(cmd: Sequence[str], log: Path, timeout_s: float, *, env: dict[str, str] | None = None,
               cwd: Path = REPO) -> tuple[int, float, bool]:
    """Run ``cmd`` under ``timeout`` with stdout+stderr appended to ``log``; returns (exit code,
    seconds, timed out). The command and the environment changes head the log."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    t = max(1, int(timeout_s))
    wrapped = (["timeout", "--kill-after=5", str(t)] if shutil.which("timeout") else []) + list(cmd)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(f'{k}={shlex.quote(v)}' for k, v in (env or {}).items())} "
                 f"{shlex.join(cmd)}\n# time box {t} s, started {datetime.datetime.now():%H:%M:%S}\n")
        fh.flush()
        t0 = time.perf_counter()
        try:
            rc = subprocess.run(wrapped, stdout=fh, stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
                                timeout=t + 30).returncode
        except subprocess.TimeoutExpired:
            rc = 124
        except OSError as err:      # the program does not exist
            fh.write(f"# could not start: {err}\n")
            rc = 127
        secs = time.perf_counter() - t0
        fh.write(f"\n# exit code {rc} after {secs:.1f} s\n")
    return rc, secs, rc in (124, 137)


_ERROR_LINE = re.compile(r"CMake Error|error:|ERROR:|Error:|Traceback|FAILED|nvcc fatal|No module named")


def first_error_line(log: Path, limit: int = 160) -> str:
    """The first line of ``log`` that looks like an error (CMake, compiler, pip, Python), cut to
    ``limit`` characters; "" when none.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "b.log"
    >>> _ = p.write_text("-- ok\\nCMake Error at CMakeLists.txt:40 (message):\\n")
    >>> first_error_line(p)
    'CMake Error at CMakeLists.txt:40 (message):'
    """
    try:
        for line in log.read_text(errors="replace").splitlines():
            if _ERROR_LINE.search(line) and not line.startswith(("$ ", "# ")):
                return line.strip()[:limit]
    except OSError:
        pass
    return ""


def command_text(cmd: Sequence[str], env: dict[str, str] | None = None) -> str:
    """The command as one would type it (environment assignments first).

    >>> command_text(["python3", "-c", "print(1)"], {"A": "b c"})
    "A='b c' python3 -c 'print(1)'"
    """
    pre = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    return (pre + " " if pre else "") + shlex.join(cmd)


def cuda_tool(name: str) -> str | None:
    """``name`` on PATH, else in ``$CUDA_HOME/bin`` (default /usr/local/cuda), else None."""
    found = shutil.which(name)
    if found:
        return found
    p = Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda") / "bin" / name
    return str(p) if p.is_file() and os.access(p, os.X_OK) else None


def probe() -> dict[str, Any]:
    """This machine: Python, torch, CUDA devices, driver, nvcc, compute-sanitizer, cmake, the
    Python modules of :data:`NEEDED_MODULES`, splatdd's backends (when installed)."""
    def out(cmd: Sequence[str]) -> str | None:
        exe = shutil.which(cmd[0])
        if exe is None:
            return None
        try:
            r = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return (r.stdout + r.stderr).strip() if r.returncode == 0 else None

    info: dict[str, Any] = {"python": sys.executable, "python_version": platform.python_version(),
                            "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["load_average"] = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["modules"] = {m: importlib.util.find_spec(m) is not None for m in NEEDED_MODULES}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["torch_threads"] = torch.get_num_threads()
        info["cuda_available"] = bool(torch.cuda.is_available())
        if info["cuda_available"]:
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_capability"] = f"{p.major}.{p.minor}"
            info["gpu_memory_gb"] = round(p.total_memory / 1e9, 1)
            info["gpu_count"] = torch.cuda.device_count()
    except Exception as err:  # noqa: BLE001 - a broken torch is a finding, not a crash
        info["torch"] = None
        info["torch_error"] = f"{type(err).__name__}: {err}"
        info["cuda_available"] = False
    smi = out(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    info["nvidia_smi"] = parse_nvidia_smi(smi) if smi else None
    nvcc = cuda_tool("nvcc")
    info["nvcc_path"] = nvcc
    text = out([nvcc, "--version"]) if nvcc else None
    info["nvcc"] = parse_nvcc_version(text) if text else None
    san = cuda_tool("compute-sanitizer")
    info["compute_sanitizer_path"] = san
    text = out([san, "--version"]) if san else None
    info["compute_sanitizer"] = text.splitlines()[-1].strip() if text else None
    text = out(["cmake", "--version"])
    info["cmake"] = text.splitlines()[0].replace("cmake version", "").strip() if text else None
    info["git_commit"] = out(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    try:
        import splatdd
        from splatdd import _C

        info["splatdd_backends"] = {"compiled": list(_C.backends()), "usable": splatdd.backends()}
    except Exception as err:  # noqa: BLE001
        info["splatdd_backends"] = f"not importable: {type(err).__name__}: {err}"
    return info


# ---- the steps -----------------------------------------------------------------------------------
class Check:
    """Runs the steps into ``results`` within ``budget_s`` seconds."""

    def __init__(self, results: Path, *, dry_run: bool, budget_s: float, python: str,
                 table20_steps: int, table20_images: int, log: Callable[[str], None] = print) -> None:
        self.results, self.logs = results, results / "logs"
        self.dry_run, self.python, self.log = dry_run, python, log
        self.table20_steps, self.table20_images = table20_steps, table20_images
        self.start = time.perf_counter()
        self.deadline = self.start + budget_s
        self.budget_s = budget_s
        self.info: dict[str, Any] = {}
        self.steps: list[StepResult] = []

    # -- helpers
    def gpu(self) -> bool:
        return not self.dry_run and bool(self.info.get("cuda_available"))

    def no_gpu_detail(self) -> str:
        if self.dry_run:
            return "--dry-run"
        return (f"torch.cuda.is_available() is False (torch {self.info.get('torch')}, "
                f"nvidia-smi: {self.info.get('nvidia_smi') or 'none'})")

    def time_box(self, index: int) -> float:
        """This step's time box: its longest, cut so that the later steps keep their minimum."""
        later = sum(s[3] for s in STEPS[index + 1:] if self.gpu() or not s[1]) + REPORT_RESERVE_S
        left = self.deadline - time.perf_counter() - later
        return min(STEPS[index][2], left)

    def run(self, name: str, cmd: Sequence[str], timeout_s: float, env: dict[str, str] | None = None
            ) -> tuple[StepResult, int]:
        log = self.logs / f"{name}.log"
        rc, secs, timed_out = run_logged(cmd, log, timeout_s, env=env)
        status = "timeout" if timed_out else ("ok" if rc == 0 else "failed")
        detail = f"time box of {timeout_s:.0f} s reached" if timed_out else ("" if rc == 0 else f"exit code {rc}")
        return StepResult(name, status, secs, round(timeout_s), command_text(cmd, env),
                          str(log.relative_to(self.results)), detail), rc

    # -- steps
    def step_env(self, timeout_s: float) -> StepResult:
        log = self.logs / "env.log"
        cmd = [self.python, str(Path(__file__).resolve()), "--probe"]
        rc, secs, timed_out = run_logged(cmd, log, timeout_s)
        text = log.read_text()
        m = re.search(r"^PROBE (\{.*\})$", text, re.M)
        self.info = json.loads(m.group(1)) if m else {}
        missing = [f"{k} (for the {v})" for k, v in NEEDED_MODULES.items()
                   if not self.info.get("modules", {}).get(k)]
        if not self.info.get("nvcc"):
            missing.append("nvcc (for the build)")
        if not self.info.get("compute_sanitizer"):
            missing.append("compute-sanitizer (for memcheck/racecheck)")
        self.info["missing"] = missing
        status = "ok" if m and rc == 0 else ("timeout" if timed_out else "failed")
        detail = ("missing: " + ", ".join(missing)) if missing else "everything needed is present"
        return StepResult("env", status, secs, round(timeout_s), command_text(cmd),
                          str(log.relative_to(self.results)), detail)

    def step_build(self, timeout_s: float) -> StepResult:
        missing = [m for m in ("scikit_build_core", "pybind11") if not self.info.get("modules", {}).get(m)]
        nvcc = self.info.get("nvcc_path")
        if missing or not nvcc:
            what = missing + ([] if nvcc else ["nvcc"])
            return StepResult("build", "failed", detail="cannot build, missing: " + ", ".join(what)
                              + " (nothing may be downloaded here; carry wheels, see docs/gpu_check.md)")
        env = {"SPLATDD_CUDA": "ON", "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 4),
               "PATH": f"{Path(nvcc).parent}:{os.environ.get('PATH', '')}"}
        cmd = [self.python, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps",
               "-v", "-e", ".", "--config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES=native",
               "--config-settings=cmake.define.SPLATDD_PTXAS_VERBOSE=ON"]
        res, rc = self.run("build", cmd, timeout_s - 15, env)
        res.command = command_text(cmd, {k: v for k, v in env.items() if k != "PATH"})
        check = [self.python, "-c", "import json, splatdd; from splatdd import _C; "
                 "print('BACKENDS ' + json.dumps({'compiled': list(_C.backends()), 'usable': splatdd.backends()}))"]
        rc2, secs2, _ = run_logged(check, self.logs / "build.log", 15)
        res.seconds += secs2
        m = re.search(r"^BACKENDS (\{.*\})$", (self.logs / "build.log").read_text(), re.M)
        backends = json.loads(m.group(1)) if m else None
        res.data["backends"] = backends
        if rc == 0 and (not backends or "cuda" not in backends["usable"]):
            res.status = "failed"
            res.detail = f"installed, but the CUDA backend is not usable: {backends or 'import failed'}"
        elif rc == 0:
            res.detail = f"splatdd.backends() = {backends['usable']}"
        else:
            res.detail += f"; {first_error_line(self.logs / 'build.log')}"
        return res

    def step_tests(self, timeout_s: float) -> StepResult:
        junit = self.logs / "junit_render.xml"
        files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_render_*.py"))
        cmd = [self.python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs",
               f"--junitxml={junit}", *files]
        res, rc = self.run("tests", cmd, timeout_s)
        if junit.exists():
            j = parse_junit(junit)
            res.data = j
            cuda = j["per_file"].get("test_render_cuda.py", {})
            res.detail = (f"{j['tests']} tests: {j['passed']} passed, {j['failed']} failed, "
                          f"{j['errors']} errors, {j['skipped']} skipped")
            if cuda and cuda["skipped"] == cuda["tests"]:
                res.status = "failed"
                res.detail += "; every CUDA test was SKIPPED (CUDA backend not built or no device)"
            elif not cuda:
                res.status = "failed"
                res.detail += "; no result for test_render_cuda.py"
        else:
            res.status = "failed" if res.status == "ok" else res.status
            res.detail = f"no junit xml written; {first_error_line(self.logs / 'tests.log')}"
        return res

    def step_sanitizer(self, tool: str, timeout_s: float) -> StepResult:
        san = self.info.get("compute_sanitizer_path")
        if not san:
            return StepResult(tool, "failed", detail="compute-sanitizer not found")
        if tool == "memcheck":
            env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
            opts = ["--tool", "memcheck", "--leak-check", "full"]
        else:
            env = {}
            opts = ["--tool", "racecheck", "--racecheck-report", "all"]
        cmd = [san, *opts, "--error-exitcode", "3", "--print-limit", "50", self.python, SANITIZER_CASE]
        res, rc = self.run(tool, cmd, timeout_s, env)
        res.command = command_text(["compute-sanitizer", *cmd[1:]], env)
        parsed = parse_sanitizer((self.logs / f"{tool}.log").read_text())
        res.data = parsed
        if parsed["unsupported"]:
            res.status = "unsupported"
            res.detail = "compute-sanitizer refused this machine's device (see the log)"
        elif res.status != "timeout":
            bits = [f"{parsed['errors']} errors" if parsed["errors"] is not None else "no ERROR SUMMARY"]
            if tool == "memcheck" and parsed["errors"]:
                bits[0] += f" ({parsed['access_errors']} access errors, the rest leaks)"
            if tool == "racecheck" and parsed["hazards"] is not None:
                bits.append(f"{parsed['hazards']} hazards ({parsed['race_errors']} errors, "
                            f"{parsed['race_warnings']} warnings)")
            if parsed["leaked_bytes"]:
                bits.append(f"{parsed['leaked_bytes']} bytes leaked in {parsed['leaked_allocations']} allocations")
            if parsed["lines_naming_splatdd"]:
                bits.append(f"{parsed['lines_naming_splatdd']} report lines name splatdd's kernels")
            if rc == 1:
                bits.append("the case's results differ from the CPU backend")
            elif rc not in (0, 3):
                bits.append(f"exit code {rc}: {first_error_line(self.logs / f'{tool}.log')}")
            res.detail = "; ".join(bits)
            if parsed["errors"] is None and res.status == "ok":
                res.status = "failed"
        return res

    def step_render_benchmark(self, timeout_s: float) -> StepResult:
        out = self.logs / "render_gpu.json"
        cmd = [self.python, "benchmarks/render_gpu.py", "--repeats", "3", "--json", str(out)]
        res, rc = self.run("render_benchmark", cmd, timeout_s)
        bits = [res.detail]
        if out.exists():
            res.data = json.loads(out.read_text())
            r = res.data.get("cuda_vs_cpu", [])
            bits.append(f"{len(res.data.get('rows', []))} rows")
            if r:
                bits.append("CUDA / CPU backend fwd+bwd: " + ", ".join(f"{x['fwd_bwd']:,.0f}x" for x in r))
        if rc != 0:
            bits.append(first_error_line(self.logs / "render_benchmark.log"))
        res.detail = "; ".join(b for b in bits if b)
        return res

    def step_table20(self, timeout_s: float) -> StepResult:
        out = self.logs / "table20.json"
        budget = max(10.0, timeout_s - 30)
        cmd = [self.python, "benchmarks/table20.py", "--device", "cuda", "--images",
               str(self.table20_images), "--steps", str(self.table20_steps), "--budget-s",
               f"{budget:.0f}", "--json", str(out)]
        res, rc = self.run("table20", cmd, timeout_s)
        bits = [res.detail]
        if out.exists():
            res.data = json.loads(out.read_text())
            rows = res.data.get("rows", [])
            ext = [r["gaussians"] for r in rows if r.get("extrapolated")]
            err = [r["gaussians"] for r in rows if "error" in r]
            bits.append(f"{len(rows)} of {len(res.data['task']['sizes'])} sizes")
            bits.append("full task" if not ext else f"extrapolated from fewer steps for {ext} (time budget)")
            if err:
                bits.append(f"FAILED for {err}")
        if rc != 0:
            bits.append(first_error_line(self.logs / "table20.log"))
        res.detail = "; ".join(b for b in bits if b)
        return res

    def skipped(self, name: str, why: str = SKIP_NO_GPU) -> StepResult:
        return StepResult(name, why, detail=self.no_gpu_detail() if why == SKIP_NO_GPU else "")

    def run_all(self, after_step: Callable[[list[StepResult]], None] | None = None
                ) -> list[StepResult]:
        """Every step in order; ``after_step(steps so far)`` after each one (the report is
        rewritten then, so a run stopped from outside keeps what it had measured)."""
        for i, (name, needs_gpu, _, minimum) in enumerate(STEPS):
            t0 = time.perf_counter()
            if needs_gpu and not self.gpu():
                res = self.skipped(name)
            else:
                box = self.time_box(i)
                if box < min(minimum, 10):
                    res = StepResult(name, "skipped: time budget used up",
                                     detail=f"{self.deadline - time.perf_counter():.0f} s left")
                else:
                    try:
                        fn = {"env": self.step_env, "build": self.step_build,
                              "tests": self.step_tests, "render_benchmark": self.step_render_benchmark,
                              "table20": self.step_table20}.get(name)
                        res = fn(box) if fn else self.step_sanitizer(name, box)
                    except Exception as err:  # noqa: BLE001 - record and go on with the next step
                        res = StepResult(name, "failed", time.perf_counter() - t0,
                                         detail=f"gpu_check error: {type(err).__name__}: {err}")
            self.steps.append(res)
            self.log(f"[gpu_check] {name}: {res.status} ({res.seconds:.1f} s) {res.detail}")
            if after_step is not None:
                try:
                    after_step(list(self.steps))
                except Exception as err:  # noqa: BLE001 - a partial report must not stop the run
                    self.log(f"[gpu_check] could not write the partial report: "
                             f"{type(err).__name__}: {err}")
        return self.steps


def with_pending(steps: Sequence[StepResult]) -> list[StepResult]:
    """``steps`` and, for every later step of :data:`STEPS`, a ``pending`` placeholder (the
    partial report written while the run goes on).

    >>> [s.status for s in with_pending([StepResult("env", "ok")])][:3]
    ['ok', 'pending', 'pending']
    """
    done = {s.name for s in steps}
    return list(steps) + [StepResult(name, "pending", detail="not reached (yet)")
                          for name, *_ in STEPS if name not in done]


# ---- the report ----------------------------------------------------------------------------------
def _load(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module (they are scripts, not a package)."""
    return _load_file(f"splatdd_bench_{name}", HERE / f"{name}.py")


def _load_file(key: str, path: Path) -> ModuleType:
    """The Python file ``path`` as the module ``sys.modules[key]`` (loaded once)."""
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[key] = mod          # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[key]
        raise
    return mod


def build_report(steps: Sequence[StepResult], info: dict[str, Any], *, dry_run: bool,
                 invocation: str, budget_s: float, wall_s: float) -> dict[str, Any]:
    """Everything as one JSON-able dict (the content of render_cuda.json)."""
    t20 = _load("table20")
    by = {s.name: s for s in steps}
    table20 = by["table20"].data if "table20" in by and by["table20"].data else None
    return {
        "schema": "splatdd-gpu-check-1",
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "dry_run": dry_run,
        "invocation": invocation,
        "budget_s": budget_s,
        "wall_s": round(wall_s, 1),
        "machine": info,
        "steps": [asdict(s) for s in steps],
        "tests": by["tests"].data if "tests" in by else {},
        "sanitizer": {t: by[t].data for t in ("memcheck", "racecheck") if t in by},
        "render_benchmark": by["render_benchmark"].data if "render_benchmark" in by else {},
        "table20": table20,
        "paper_table20": {"source": t20.PAPER_SOURCE, "sizes": list(t20.PAPER_SIZES),
                          "rows": t20.paper_rows(),
                          "task": "fit 1,000 ImageNet images (10 classes x 100), seconds for the whole "
                                  "fit, three runs averaged, PyTorch 2.5.1, CUDA <= 12.0"},
    }


def machine_lines(info: dict[str, Any]) -> list[str]:
    smi = info.get("nvidia_smi") or []
    gpu = info.get("gpu") or (smi[0]["name"] if smi else "none")
    driver = smi[0]["driver"] if smi else "unknown (no nvidia-smi)"
    mem = smi[0]["memory"] if smi else (f"{info['gpu_memory_gb']} GB" if info.get("gpu_memory_gb") else "?")
    return [
        f"- GPU: {gpu}" + (f" (compute capability {info['gpu_capability']}, {mem})" if info.get("gpu_capability") else ""),
        f"- driver: {driver}",
        f"- CUDA: nvcc {info.get('nvcc') or 'not found'}; torch built with CUDA {info.get('torch_cuda')}",
        f"- compute-sanitizer: {info.get('compute_sanitizer') or 'not found'}; cmake {info.get('cmake') or 'not found'}",
        f"- torch {info.get('torch')} ({info.get('torch_threads')} threads), Python "
        f"{info.get('python_version')} ({info.get('python')})",
        f"- CPU: {info.get('cpu', '?')}, {info.get('cpu_count')} logical cores; load average at start "
        f"{info.get('load_average')}",
        f"- source: git commit {info.get('git_commit') or 'unknown (no .git on this machine)'}",
        f"- missing: {', '.join(info.get('missing') or []) or 'nothing'}",
    ]


def render_markdown(rep: dict[str, Any]) -> str:
    """render_cuda.md from :func:`build_report`'s dict."""
    t20 = _load("table20")
    info = rep["machine"]
    md = ["# CUDA backend on a GPU: build, tests, sanitizers, speed", ""]
    if rep["dry_run"]:
        md += ["**Dry run**: nothing that needs a GPU was run; every GPU step reads "
               f"\"{SKIP_NO_GPU}\".", ""]
    md += [f"- date: {rep['date']}; whole run {rep['wall_s']} s (budget {rep['budget_s']:.0f} s)"]
    md += machine_lines(info)
    md += ["", "## Commands", "", "```", rep["invocation"]]
    md += [s["command"] for s in rep["steps"] if s["command"]]
    md += ["```", "", "## Steps", "", "| step | status | seconds | time box s | detail | log |", "|---|---|---|---|---|---|"]
    for s in rep["steps"]:
        md.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['timeout_s'] or '-'} | "
                  f"{s['detail'].replace('|', '/')} | {s['log'] or '-'} |")
    tests = rep["tests"]
    if tests.get("failures"):
        md += ["", "### Failing tests", ""] + [f"- `{f}`" for f in tests["failures"]]
    if tests.get("per_file"):
        md += ["", "| test file | tests | passed | failed | errors | skipped |", "|---|---|---|---|---|---|"]
        md += [f"| {k} | {v['tests']} | {v['passed']} | {v['failed']} | {v['errors']} | {v['skipped']} |"
               for k, v in sorted(tests["per_file"].items())]
    for tool, d in rep["sanitizer"].items():
        if d.get("reports"):
            md += ["", f"### {tool} reports (first {len(d['reports'])} distinct)", ""]
            md += [f"- `{r}`" for r in d["reports"]]
    md += ["", "## Renderer: CUDA backend vs dense reference (GPU) vs CPU backend", ""]
    rb = rep["render_benchmark"]
    if rb.get("rows"):
        rg = _load("render_gpu")
        md += [f"C = {rb['channels']}, ssaa = {rb['ssaa']}, prefilter on, fp32; images/s, best of "
               f"{rb['repeats']} after a warm-up; CPU backend with {rb['cpu_threads']} torch threads; "
               f"workloads: {rb['configs_source']}. Speed-ups against the dense reference on the GPU.", ""]
        md += rg.TABLE_HEAD + [rg.format_row(r) for r in rb["rows"]]
        md += [""] + [f"- {r['workload']}: CUDA / CPU backend: forward {r['fwd']:,.1f}x, forward+backward "
                      f"{r['fwd_bwd']:,.1f}x" for r in rb.get("cuda_vs_cpu", [])]
    else:
        md += ["Not run (see the steps)."]
    md += ["", f"## GSDD Table 20 task beside the paper ({t20.PAPER_SOURCE})", ""]
    t = rep["table20"]
    if t:
        task = t["task"]
        md += [f"Fit {task['images']} images at {task['resolution']} px for {task['steps']} Adam steps "
               f"(lr {task['lr']}, C = {task['channels']}, ssaa {task['ssaa']}), one renderer call per "
               f"step for the whole set. Timed: {task['timed']}. Images: {task['image_source']}.", ""]
        md += t["table_md"]
        errors = [f"{r['gaussians']}: {r['error']}" for r in t["rows"] if "error" in r]
        if errors:
            md += ["", "Failed sizes:"] + [f"- {e}" for e in errors]
        if any(r.get("extrapolated") for r in t["rows"]):
            md += ["", "\\* extrapolated: the fit stopped early to keep the time budget; seconds = "
                       "measured seconds per step x the task's steps. Steps run: "
                   + ", ".join(f"{r['gaussians']}: {r['steps_run']}/{r['steps']}" for r in t["rows"]
                               if "error" not in r)]
    else:
        md += t20.comparison_table([], "this GPU") + ["", "Our rows: not run (see the steps)."]
    md += ["", f"Paper rows: {t20.PAPER_SOURCE} (1,000 ImageNet images, three runs averaged, "
               "PyTorch 2.5.1, CUDA <= 12.0); its memory is the same on every GPU it lists. Ours: "
               "peak `torch.cuda.max_memory_allocated` over the timed fit (targets, parameters, Adam "
               "state, renderer buffers; not the CUDA context).", ""]
    return "\n".join(md)


def summary(rep: dict[str, Any]) -> list[str]:
    """The one-screen summary printed at the end."""
    info = rep["machine"]
    out = [f"==== splatdd GPU check{' (DRY RUN)' if rep['dry_run'] else ''}: {rep['date']}, "
           f"{rep['wall_s']} s of {rep['budget_s']:.0f} s ===="]
    out += [ln[2:] for ln in machine_lines(info)[:5]]
    out.append(f"missing: {', '.join(info.get('missing') or []) or 'nothing'}")
    for s in rep["steps"]:
        out.append(f"  {s['name']:<17} {s['status']:<20} {s['seconds']:7.1f} s  {s['detail'][:110]}")
    fails = rep["tests"].get("failures") or []
    out += [f"    FAILED {f[:120]}" for f in fails[:6]]
    if len(fails) > 6:
        out.append(f"    ... and {len(fails) - 6} more (render_cuda.md lists them all)")
    rb = rep["render_benchmark"]
    for r in rb.get("cuda_vs_cpu", []) if rb else []:
        out.append(f"  render {r['workload']}: CUDA/CPU fwd {r['fwd']:,.1f}x, fwd+bwd {r['fwd_bwd']:,.1f}x")
    t20 = _load("table20")
    t = rep["table20"]
    out.append(f"Table 20 (seconds; {t20.PAPER_SOURCE} rows beside ours"
               + (f"; ours: {t['task']['images']} images x {t['task']['steps']} steps" if t else "") + "):")
    out += ["  " + ln for ln in (t["table_md"] if t else t20.comparison_table([], "this GPU"))]
    if t and any(r.get("extrapolated") for r in t["rows"]):
        out.append("  * extrapolated from the measured seconds per step (time budget)")
    return out


def write_outputs(results: Path, rep: dict[str, Any], export: Path | None) -> list[Path]:
    """render_cuda.md and render_cuda.json into ``results`` (atomically); with ``export``, copies
    of both and logs.tar.gz there."""
    # The source tree's io_utils by path, never ``import splatdd``: this process started before
    # the build step, so an editable install made since is only half visible here (its finder
    # hook loads at interpreter start-up, but site-packages/splatdd/ holding _C alone is found as
    # a namespace package without io_utils), and a failed build installs nothing at all.
    io_utils = _load_file("splatdd_gpu_check_io_utils", REPO / "src" / "splatdd" / "io_utils.py")
    atomic_write_json, atomic_write_text = io_utils.atomic_write_json, io_utils.atomic_write_text
    results.mkdir(parents=True, exist_ok=True)
    md, js = results / "render_cuda.md", results / "render_cuda.json"
    atomic_write_text(md, render_markdown(rep))
    atomic_write_json(js, rep)
    written = [md, js]
    if export is not None:
        export.mkdir(parents=True, exist_ok=True)
        for p in (md, js):
            shutil.copy2(p, export / p.name)
        with tarfile.open(export / "gpu_check_logs.tar.gz", "w:gz") as tar:
            tar.add(results / "logs", arcname="logs")
        written += [export / md.name, export / js.name, export / "gpu_check_logs.tar.gz"]
    return written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, nargs="?", help="results folder (e.g. benchmarks/results)")
    ap.add_argument("--dry-run", action="store_true", help="skip every step that needs a GPU")
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the whole run")
    ap.add_argument("--table20-steps", type=int, default=1000, help="Adam steps (the task: 1000)")
    ap.add_argument("--table20-images", type=int, default=1000, help="images (the task: 1000)")
    ap.add_argument("--export", type=Path, default=None,
                    help="also copy render_cuda.{md,json} and logs.tar.gz here (the device's $OUT)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the steps")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        print("PROBE " + json.dumps(probe()))
        return 0
    if args.results is None:
        ap.error("the results folder is required")
    if args.budget_s < 30:
        ap.error(f"--budget-s must be >= 30, got {args.budget_s}")
    if args.table20_steps < 1 or args.table20_images < 1:
        ap.error("--table20-steps and --table20-images must be >= 1")
    results = args.results.resolve()
    (results / "logs").mkdir(parents=True, exist_ok=True)
    for old in (results / "logs").glob("*"):
        if old.is_file():
            old.unlink()        # this run's logs only
    invocation = "bash scripts/gpu_check.sh " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    check = Check(results, dry_run=args.dry_run, budget_s=args.budget_s, python=args.python,
                  table20_steps=args.table20_steps, table20_images=args.table20_images)
    def report(steps: Sequence[StepResult]) -> dict[str, Any]:
        return build_report(steps, check.info, dry_run=args.dry_run, invocation=invocation,
                            budget_s=args.budget_s, wall_s=time.perf_counter() - check.start)

    check.run_all(after_step=lambda steps: write_outputs(results, report(with_pending(steps)),
                                                         args.export))
    rep = report(check.steps)
    written = write_outputs(results, rep, args.export)
    print("\n".join(summary(rep)))
    print("wrote " + ", ".join(str(p) for p in written))
    return exit_status(check.steps)


def exit_status(steps: Sequence[StepResult]) -> int:
    """0 when every step passed, was skipped or could not run its tool here (``unsupported``),
    else 1.

    >>> exit_status([StepResult("env", "ok"), StepResult("memcheck", "unsupported")])
    0
    """
    return 0 if all(s.status in ("ok", "unsupported") or s.status.startswith("skipped")
                    for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
