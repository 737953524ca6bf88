"""Fresh-venv install transcript (issue 18): every documented install path (docs/install.md), run
as a new user would, with its wall time and outcome, written to benchmarks/results/install.md and
install.json.

    heavy python benchmarks/install_transcript.py               # every install path
    heavy python benchmarks/install_transcript.py --groups readme --main-job   # README command 1 only,
                                                    # main job included; other steps kept from before

Everything happens in a work folder (``--work``; default a new temporary folder, removed at the end
unless ``--keep``): a fresh ``git clone`` of this checkout's HEAD (the committed state), and new
virtual environments made with ``python -m venv`` (no system site-packages). The paths:

1. README command 1, install part: ``bash scripts/install.sh`` in the clone, in venv ``readme``;
2. ``bash scripts/build_wheels.sh WHEELHOUSE`` (with the python running this script);
3. ``pip install torch==2.13.0`` then ``pip install --find-links WHEELHOUSE "splatdd[diffusion]"``
   in venv ``wheels``; 4. ``pip install --find-links WHEELHOUSE "splatdd[all]"`` on top;
5. one plugin alone: venv ``one``, torch, the core from the wheelhouse, then
   ``pip install plugins/ld3m`` (build isolation, as a user types it);
6. with ``--main-job``: the ``splatdd distill ...`` part of README command 1, read from the
   README.md of this working tree at run time, run in the clone with the ``readme`` venv.

Each outcome is checked (``splatdd plugins --strict``: which plugins, all loading) and every venv's
torch must still be 2.13.0 afterwards (pip never resolved another). The C++ module is built with
``SPLATDD_CUDA=OFF`` unless ``--cuda`` (then the CUDA backend's compile time is included). Wall
times include pip's work on this machine's local package mirror; the load average is recorded
before and after each step (the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from splatdd.io_utils import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TORCH = "2.13.0"


@dataclass
class Step:
    """One timed command of the transcript."""

    name: str
    command: str
    seconds: float
    returncode: int
    ok: bool
    outcome: str
    load_before: str
    load_after: str
    tail: list[str] = field(default_factory=list)
    group: str = ""
    commit: str = ""
    date: str = ""


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def machine() -> dict[str, str]:
    """CPU, cores, memory, OS, Python and the checkout's commit."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    os_name = platform.platform()
    if Path("/etc/os-release").is_file():
        m = re.search(r'^PRETTY_NAME="?([^"\n]+)', Path("/etc/os-release").read_text(), re.M)
        os_name = m.group(1) if m else os_name
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory_gib": f"{mem_kb / 2**20:.1f}",
            "os": os_name, "python": platform.python_version(), "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


class Transcript:
    """Runs the steps and keeps their records."""

    def __init__(self, work: Path, cuda: str) -> None:
        self.work = work
        self.steps: list[Step] = []
        self.group = ""
        self.commit = ""
        self.env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
                        PIP_ROOT_USER_ACTION="ignore", SPLATDD_CUDA=cuda, SPLATDD_SKIP_APT="1")
        for var in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHON"):
            self.env.pop(var, None)

    def venv_env(self, venv: Path) -> dict[str, str]:
        """The environment of an activated ``venv``."""
        return dict(self.env, VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}:{self.env['PATH']}")

    def run(self, name: str, command: str, *, cwd: Path, env: dict[str, str], check=None,
            record: bool = True) -> Step:
        """Run ``command`` in bash; ``check(stdout) -> (ok, outcome)`` judges a zero exit."""
        print(f"[install_transcript] {name}: {command}", file=sys.stderr, flush=True)
        before = loadavg()
        t0 = time.perf_counter()
        r = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        out = r.stdout + r.stderr
        if r.returncode != 0:
            ok, outcome = False, f"failed (exit {r.returncode})"
        elif check is None:
            ok, outcome = True, "ok"
        else:
            ok, outcome = check(r.stdout)
        step = Step(name, command.replace(str(self.work), "$WORK"), round(seconds, 1), r.returncode, ok, outcome, before, loadavg(),
                    [line for line in out.splitlines() if line.strip()][-12:], self.group, self.commit,
                    time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        print(f"[install_transcript]   {seconds:.1f} s, {outcome}", file=sys.stderr, flush=True)
        if record:
            self.steps.append(step)
        return step


def plugins_check(expected_distributions: set[str]):
    """A check of ``splatdd plugins --json --strict`` output: exactly these plugin distributions
    (besides the core's own entry points), every entry point loading."""
    def check(stdout: str) -> tuple[bool, str]:
        rows = json.loads(stdout[stdout.index("["):])
        dists = {r["distribution"] for r in rows} - {"splatdd"}
        bad = [f"{r['name']}: {r['status']}" for r in rows if r["status"] != "ok"]
        ok = not bad and dists == expected_distributions
        names = ", ".join(sorted(d.removeprefix("splatdd-") for d in dists)) or "none"
        return ok, (f"{len(rows)} entry points load ({names})" if ok else
                    f"WRONG: plugins {sorted(dists)}, expected {sorted(expected_distributions)}; {bad}")
    return check


def pip_check(*, torch_allowed: bool = False):
    """A check of pip's output: what it installed (its "Successfully installed" line); installing
    torch is a failure unless ``torch_allowed`` (the torch-first step)."""
    def check(stdout: str) -> tuple[bool, str]:
        m = re.search(r"^Successfully installed (.+)$", stdout, re.M)
        names = [n.rsplit("-", 1)[0] for n in m.group(1).split()] if m else []
        names.sort(key=lambda n: (not n.startswith(("torch", "splatdd")), n.lower()))
        if "torch" in names and not torch_allowed:
            return False, f"WRONG: pip installed torch: {', '.join(names)}"
        shown = ", ".join(names[:6]) + (f", ... ({len(names)} packages)" if len(names) > 6 else "")
        return True, f"installed {shown}" if names else "nothing to install"
    return check


def wheels_check(expected: int):
    """A check of build_wheels.sh's output: ``expected`` wheels built."""
    def check(stdout: str) -> tuple[bool, str]:
        wheels = re.findall(r"^splatdd\S*\.whl$", stdout, re.M)
        return len(wheels) == expected, f"{len(wheels)} wheels (expected {expected})"
    return check


def readme_main_job(readme: Path) -> str:
    """The main-job part of README command 1: what follows ``bash scripts/install.sh &&`` on the
    first such line (backslash continuations joined)."""
    text = readme.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith("bash scripts/install.sh &&") and "scripts/test.sh" not in line:
            return " ".join(line.split("&&", 1)[1].split())
    raise SystemExit(f"install_transcript: no 'bash scripts/install.sh && ...' main-job line in {readme}")


def accuracy_check(stdout: str) -> tuple[bool, str]:
    """The main job's printed accuracy line (and the evaluation protocol line, if printed)."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    acc = [line for line in lines if "accuracy" in line.lower()]
    protocol = [line for line in lines if "protocol" in line.lower() and line not in acc]
    if not acc:
        return False, "no accuracy printed"
    return True, " / ".join(protocol[-1:] + acc[-1:])


def plugin_distributions(clone: Path) -> set[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    out = set()
    for p in (clone / "plugins").glob("*/pyproject.toml"):
        with open(p, "rb") as f:
            out.add(tomllib.load(f)["project"]["name"])
    return out


GROUPS = ("readme", "wheels")


def transcript(work: Path, *, cuda: str, groups: tuple[str, ...], main_job: bool) -> tuple[list[Step], dict]:
    """Run the install paths of ``groups`` ("readme": README command 1, its main job with
    ``main_job``; "wheels": the wheelhouse, the two extras and one plugin alone)."""
    t = Transcript(work, cuda)
    clone = work / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True,
                            text=True, check=True).stdout.strip()
    t.commit = commit
    everything = plugin_distributions(clone)
    strict = "splatdd plugins --json --strict"
    torch_check = (f'python -c "import torch; assert torch.__version__.split(\'+\')[0] == \'{TORCH}\', '
                   f'torch.__version__; print(torch.__version__)"')
    info: dict = {"splatdd_cuda": cuda}

    def kept_torch(venv: Path) -> None:
        t.run(f"-> torch in venv {venv.name}", torch_check, cwd=work, env=t.venv_env(venv),
              check=lambda out: (out.strip().split("+")[0] == TORCH, f"torch {out.strip()} (unchanged)"))

    if "readme" in groups:
        t.group = "readme"
        venv = work / "venv-readme"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        e = t.venv_env(venv)
        t.run("README command 1: install", "bash scripts/install.sh", cwd=clone, env=e,
              check=lambda out: (True, "installed; `splatdd plugins --strict` passes"))
        t.run("-> splatdd plugins", strict, cwd=clone, env=e, check=plugins_check(everything))
        if main_job:
            threads = subprocess.run(["python", "-c", "import torch; print(torch.get_num_threads())"],
                                     env=e, capture_output=True, text=True).stdout.strip()
            job = readme_main_job(ROOT / "README.md")
            info.update(main_job_command=job, main_job_torch_threads=threads)
            t.run("README command 1: main job", job, cwd=clone, env=e, check=accuracy_check)
        kept_torch(venv)

    if "wheels" in groups:
        t.group = "wheels"
        wh = shlex.quote(str(work / "wheelhouse"))
        venvs = {name: work / f"venv-{name}" for name in ("wheels", "one")}
        for venv in venvs.values():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        # the wheelhouse, built with the developer's python (build requirements installed or installed now)
        t.run("wheelhouse: build", f"bash scripts/build_wheels.sh {wh}", cwd=clone,
              env=dict(t.env, PYTHON=sys.executable), check=wheels_check(len(everything) + 1))
        # splatdd[diffusion] from the wheelhouse, torch first; then splatdd[all] on top
        e = t.venv_env(venvs["wheels"])
        t.run("splatdd[diffusion]: torch first", f"pip install torch=={TORCH}", cwd=work, env=e,
              check=pip_check(torch_allowed=True))
        t.run("splatdd[diffusion]", f'pip install --find-links {wh} "splatdd[diffusion]"', cwd=work, env=e,
              check=pip_check())
        t.run("-> splatdd plugins", strict, cwd=work, env=e, check=plugins_check({"splatdd-ld3m"}))
        t.run("splatdd[all]", f'pip install --find-links {wh} "splatdd[all]"', cwd=work, env=e,
              check=pip_check())
        t.run("-> splatdd plugins", strict, cwd=work, env=e, check=plugins_check(everything))
        kept_torch(venvs["wheels"])
        # one plugin alone, next to the core
        e = t.venv_env(venvs["one"])
        t.run("one plugin: torch first", f"pip install torch=={TORCH}", cwd=clone, env=e,
              check=pip_check(torch_allowed=True))
        t.run("one plugin: the core", f"pip install --find-links {wh} splatdd", cwd=clone, env=e,
              check=pip_check())
        t.run("one plugin: ld3m", "pip install plugins/ld3m", cwd=clone, env=e, check=pip_check())
        t.run("-> splatdd plugins", strict, cwd=clone, env=e, check=plugins_check({"splatdd-ld3m"}))
        kept_torch(venvs["one"])
    return t.steps, info


def merge_previous(steps: list[Step], info: dict, out: Path, groups: tuple[str, ...]) -> tuple[list[Step], dict]:
    """Keep the steps (and main-job info) of groups not run this time from ``out``'s JSON."""
    path = out.with_suffix(".json")
    if not path.is_file():
        return steps, info
    old = json.loads(path.read_text())
    kept = [Step(**s) for s in old.get("steps", []) if s.get("group") not in groups]
    if "readme" not in groups:
        info = {**{k: v for k, v in old.items() if k.startswith("main_job")}, **info}
    merged = kept + steps
    merged.sort(key=lambda s: GROUPS.index(s.group) if s.group in GROUPS else len(GROUPS))
    return merged, info


def write_results(steps: list[Step], info: dict, mach: dict, out: Path) -> None:
    install = next((s for s in steps if s.name == "README command 1: install"), None)
    job = next((s for s in steps if s.name == "README command 1: main job"), None)
    data = {"machine": mach, **info, "steps": [asdict(s) for s in steps]}
    if install and job:
        data["readme_command_1_seconds"] = round(install.seconds + job.seconds, 1)
    atomic_write_json(out.with_suffix(".json"), data)
    lines = [
        "# Install transcript (fresh virtual environments)",
        "",
        f"Generated by `benchmarks/install_transcript.py`. Machine: {mach['cpu']}, {mach['cores']} cores "
        f"(shared with other jobs: see the load averages), {mach['memory_gib']} GiB, {mach['os']}, "
        f"Python {mach['python']}. Each group of steps runs in a fresh `git clone` of the commit shown, "
        f"every venv made with `python -m venv` (no system site-packages); the C++ module built with "
        f"`SPLATDD_CUDA={info['splatdd_cuda']}`. pip reads this machine's local package mirror and its "
        f"local torch {TORCH} CPU wheel (`PIP_FIND_LINKS`), so the times contain no download time. "
        "`$WORK` is the work folder; load averages are `/proc/loadavg`'s 1, 5 and 15 minute figures.",
        "",
        "| step | command | wall time | load before / after | outcome | commit, finished |",
        "|---|---|---|---|---|---|",
    ]
    for s in steps:
        cmd = s.command if len(s.command) < 90 else s.command[:87] + "..."
        lines.append(f"| {s.name} | `{cmd}` | {s.seconds:.1f} s | {s.load_before} / {s.load_after} | "
                     f"{'ok' if s.ok else 'FAILED'}: {s.outcome} | {s.commit}, {s.date} |")
    if job:
        lines += ["", "## README command 1, main job", "",
                  f"`{info['main_job_command']}` (read from README.md at run time), torch threads: "
                  f"{info['main_job_torch_threads']}.", "",
                  f"- wall time: {job.seconds / 60:.1f} min ({job.seconds:.0f} s), load average "
                  f"{job.load_before} before, {job.load_after} after",
                  f"- printed: `{job.outcome}`"]
        if install:
            lines.append(f"- README command 1 in total (install + main job): "
                         f"{data['readme_command_1_seconds'] / 60:.1f} min")
    paths = {"README command 1, install part (`scripts/install.sh`)": ["README command 1: install"],
             "wheelhouse + `splatdd[diffusion]` (build, torch, install)":
                 ["wheelhouse: build", "splatdd[diffusion]: torch first", "splatdd[diffusion]"],
             "`splatdd[all]` on top of that": ["splatdd[all]"],
             "one plugin: torch, the core from the wheelhouse, `pip install plugins/ld3m`":
                 ["one plugin: torch first", "one plugin: the core", "one plugin: ld3m"]}
    by_name = {s.name: s for s in steps}
    summary = [f"| {label} | {sum(by_name[n].seconds for n in names) / 60:.1f} min | "
               f"{'ok' if all(by_name[n].ok for n in names) else 'FAILED'} |"
               for label, names in paths.items() if all(n in by_name for n in names)]
    if summary:
        at = lines.index("| step | command | wall time | load before / after | outcome | commit, finished |")
        lines[at:at] = ["Per install path (sums of the steps below):", "",
                        "| path | wall time | outcome |", "|---|---|---|", *summary, "", "Every step:", ""]
    failed = [s for s in steps if not s.ok]
    if failed:
        lines += ["", "## Failures", ""]
        for s in failed:
            lines += [f"### {s.name}", "", "```", *s.tail, "```", ""]
    lines += ["", "Commands per path: docs/install.md. Tail of every step's output: install.json."]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", default=",".join(GROUPS),
                    help="comma-separated: readme (README command 1), wheels (wheelhouse, extras, one "
                         "plugin); the other groups' steps are kept from the previous results")
    ap.add_argument("--main-job", action="store_true", help="also run README command 1's main job")
    ap.add_argument("--cuda", default="OFF", choices=["OFF", "AUTO", "ON"], help="SPLATDD_CUDA for the builds")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--out", type=Path, default=RESULTS / "install", help="results path without suffix")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json; run nothing")
    args = ap.parse_args(argv)
    if args.report_only:
        data = json.loads(args.out.with_suffix(".json").read_text())
        steps = [Step(**s) for s in data.pop("steps")]
        mach = data.pop("machine")
        data.pop("readme_command_1_seconds", None)
        write_results(steps, data, mach, args.out)
        print(args.out.with_suffix(".md").read_text())
        return 0
    groups = tuple(g for g in args.groups.split(",") if g)
    if not groups or set(groups) - set(GROUPS):
        ap.error(f"--groups: choose from {', '.join(GROUPS)}, got {args.groups!r}")
    if args.main_job and "readme" not in groups:
        ap.error("--main-job needs the readme group")
    work = args.work or Path(tempfile.mkdtemp(prefix="splatdd-install-"))
    if args.work is not None:
        if work.exists() and any(work.iterdir()):
            ap.error(f"--work {work} is not empty")
        work.mkdir(parents=True, exist_ok=True)
    mach = machine()
    try:
        steps, info = transcript(work.resolve(), cuda=args.cuda, groups=groups, main_job=args.main_job)
        ok = all(s.ok for s in steps)
        steps, info = merge_previous(steps, info, args.out, groups)
        write_results(steps, info, mach, args.out)
    finally:
        if not args.keep:
            print(f"[install_transcript] removing {work}", file=sys.stderr, flush=True)
            shutil.rmtree(work, ignore_errors=True)
    print(args.out.with_suffix(".md").read_text())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
