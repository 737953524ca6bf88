"""Wall time of every command in the README's "Command line" block (issue 19), through the real
``splatdd`` entry point, written to benchmarks/results/readme_timings.{json,md}.

    heavy python benchmarks/readme_timings.py                 # every entry (~10 min on 2 cores)
    heavy python benchmarks/readme_timings.py --only fit      # rerun one entry (and what it needs)
    python benchmarks/readme_timings.py --list

Each entry is one README command, run in one of three ways (the ``kind`` column):

* ``full``: the README's command as written;
* ``quick``: a quick variant (fewer iterations, epochs or runs; the changed flags are listed),
  because the README's command takes from many minutes to hours on a 2-core CPU. Where the cost
  scales linearly, the entry also gives an *estimate* of the README command's time from the
  measured rates (distillation seconds per iteration, evaluation seconds per network-epoch, fit
  seconds per step), labelled as an estimate;
* ``probe``: the README's command itself, stopped with Ctrl-C (SIGINT) after ``--probe-seconds``;
  its last progress lines (with their ETA) are quoted.

README command 1's main job (``splatdd distill --config fmnist-main``) is timed in a fresh clone by
benchmarks/install_transcript.py (benchmarks/results/install.md); this script quotes that figure
instead of running it. Every command runs in a work folder (``--work``; default a temporary one)
with the machine's FashionMNIST, torch's default thread count (recorded), and stdout/stderr piped
(so progress comes as plain lines). The load average is recorded before and after each command:
the machine is shared, so times are this run's, under that load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from splatdd.runtime import cpu_model
from splatdd.io_utils import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
JSON_PATH, MD_PATH = RESULTS / "readme_timings.json", RESULTS / "readme_timings.md"


@dataclass
class Entry:
    """One README command and how this script runs it."""

    name: str
    readme: str                       # the command as the README prints it
    kind: str                         # full | quick | probe | quoted
    argv: list[str]                   # what runs ({work} and {splatdd} are filled in)
    changes: str = ""                 # quick variants: what differs from the README's command
    needs: tuple[str, ...] = ()       # entries whose outputs this one uses
    makes: str | None = None          # its output (in the work folder) that other entries use
    estimate: Callable[["Record", Path], tuple[float, str] | None] | None = None
    prepare: Callable[[Path], None] | None = None
    note: str = ""


@dataclass
class Record:
    """What one entry measured."""

    name: str
    readme: str
    kind: str
    command: str
    changes: str
    seconds: float | None
    returncode: int | None
    load_before: list[float]
    load_after: list[float]
    estimate_seconds: float | None = None
    estimate_how: str = ""
    note: str = ""
    in_readme: bool = True
    tail: list[str] = field(default_factory=list)


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


# ---- estimates from the results files the quick variants write ------------------------------------
def _results(work: Path, run: str) -> dict[str, Any]:
    return json.loads((work / "runs" / run / "results.json").read_text())


def _default_epochs(protocol: str) -> int:
    from splatdd.registry import default_registry
    return int(default_registry().get("protocol", protocol)().config()["epochs"])


def _resume_step(work: Path) -> None:
    """Before the resumed run: note the step its checkpoint holds (the estimate needs it)."""
    import torch
    step = int(torch.load(work / "runs" / "g" / "checkpoint.pt", weights_only=False)["step"])
    (work / "resume_step.json").write_text(json.dumps({"step": step}))


def _estimate_distill(run: str, iterations: int, runs: int, *, resumed: bool = False
                      ) -> Callable[[Record, Path], tuple[float, str] | None]:
    """README distill command: init + ``iterations`` x (s per iteration) + ``runs`` x default
    epochs x (s per network-epoch), plus this run's remaining overhead, from results.json."""
    def est(rec: Record, work: Path) -> tuple[float, str] | None:
        res = _results(work, run)
        start = json.loads((work / "resume_step.json").read_text())["step"] if resumed else 0
        done = res["iterations"] - start
        per_it = res["distill_seconds"] / max(done, 1)
        row = res["after"][0]
        per_epoch = row["seconds"] / (row["runs"] * row["settings"]["epochs"])
        epochs = _default_epochs(row["protocol"])
        # a resumed run does not initialise again (its results.json repeats the first init's)
        init = 0.0 if resumed else float((res.get("init") or {}).get("seconds", 0.0))
        overhead = rec.seconds - res["distill_seconds"] - row["seconds"] - init
        loop = overhead + init + iterations * per_it
        total = loop + runs * epochs * per_epoch
        return total, (f"at most: {overhead:.0f} s start-up + {init:.0f} s init + {iterations} "
                       f"it x {per_it:.2f} s (= {_fmt(loop)} to the distilled file) + evaluation "
                       f"{runs} x {epochs} epochs x {per_epoch:.2f} s ({row['protocol']} "
                       f"protocol; an upper bound: the per-epoch rate also carries the one test "
                       f"pass over 10,000 images of the quick run)")
    return est


def _estimate_eval(rec: Record, work: Path) -> tuple[float, str] | None:
    res = json.loads((work / "eval.json").read_text())
    overhead, total, parts = rec.seconds, 0.0, []
    for row in res["rows"]:
        epochs = _default_epochs(row["protocol"])
        per_epoch = row["seconds"] / (row["runs"] * row["settings"]["epochs"])
        overhead -= row["seconds"]
        total += 3 * epochs * per_epoch
        parts.append(f"{row['model']} 3 x {epochs} epochs x {per_epoch:.2f} s")
    return overhead + total, (f"at most: {overhead:.0f} s start-up + " + " + ".join(parts)
                              + " (an upper bound: the per-epoch rates also carry the quick "
                                "run's test pass per network)")


def _estimate_torchrun_eval(rec: Record, work: Path) -> tuple[float, str] | None:
    """4 networks over 2 processes: 2 per process, each the protocol's default epochs, at the
    per-epoch rate rank 0 measured for its share."""
    res = json.loads((work / "eval_torchrun.json").read_text())
    row = res["rows"][0]
    epochs = _default_epochs(row["protocol"])
    mine = max(1, row["runs"] // 2)                       # networks rank 0 trained
    per_epoch = row["seconds"] / (mine * row["settings"]["epochs"])
    overhead = rec.seconds - row["seconds"]
    return (overhead + 2 * epochs * per_epoch,
            f"at most: {overhead:.0f} s start-up + 2 networks per process x {epochs} epochs x "
            f"{per_epoch:.2f} s")


def _estimate_fit(rec: Record, work: Path) -> tuple[float, str] | None:
    res = json.loads((work / "fit.json").read_text())
    fitted = sum(r["seconds"] for r in res["results"])
    full = sum(r["seconds_per_step"] * 1000 if r["seconds_per_step"] == r["seconds_per_step"]
               else r["seconds"] for r in res["results"])
    rates = ", ".join(f"{r['method']} {r['seconds_per_step']:.3f}" for r in res["results"]
                      if r["seconds_per_step"] == r["seconds_per_step"])      # not NaN
    return (rec.seconds - fitted + full,
            f"{rec.seconds - fitted:.0f} s start-up and data + 1000 steps at each method's "
            f"measured s/step ({rates})")


# ---- a stand-in for the ImageNette folder ------------------------------------------------------
def _image_folder(work: Path, classes: int = 10, per_class: int = 12, size: int = 128) -> None:
    """A generated 10-class image folder (train/ and val/) of blob images, for the preset's
    quick variant: ImageNette is not on this machine."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for split, n in (("train", per_class), ("val", 2)):
        for c in range(classes):
            d = work / "imagenette" / split / f"class{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                cy, cx = 0.2 + 0.06 * c, 0.8 - 0.06 * c
                blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)[..., None]
                img = np.clip(255 * blob * rng.uniform(0.5, 1, 3) + rng.normal(0, 20, (size, size, 3)),
                              0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")


def entries() -> list[Entry]:
    """The README's "Command line" block, one entry per command, in its order."""
    g = ["--param", "gaussian", "--algo", "dm", "--ipc", "1"]
    return [
        Entry("plugins", "splatdd plugins", "full", ["{splatdd}", "plugins"]),
        Entry("config-list", "splatdd config list", "full", ["{splatdd}", "config", "list"]),
        Entry("fmnist-main", "splatdd distill --config fmnist-main", "quoted", [],
              note="README command 1's main job, timed in a fresh clone on unloaded cores by "
                   "benchmarks/install_transcript.py: benchmarks/results/install.md"),
        Entry("imagenet-preset", "splatdd distill --config gsdd-imagenet128-dm-ipc1 --set "
              "dataset.root=/data/imagenette --set iterations=500", "quick",
              ["{splatdd}", "distill", "--config", "gsdd-imagenet128-dm-ipc1", "--set",
               "dataset.root={work}/imagenette", "--set", "iterations=2", "--set", "eval.runs=0",
               "--set", "param_options.gpc=10", "--set", "init_steps=5", "--out",
               "runs/imagenet-quick"],
              changes="a generated 10-class folder of 12 images per class (ImageNette is not on "
                      "this machine), gpc 10 instead of 200, init_steps 5, 2 iterations, no "
                      "evaluation: a smoke run of the preset, not indicative of its time",
              prepare=_image_folder),
        Entry("distill-gaussian", "splatdd distill --param gaussian --algo dm --ipc 1 "
              "--iterations 200 --out runs/g", "quick",
              ["{splatdd}", "distill", *g, "--iterations", "10", "--eval-runs", "1",
               "--eval-epochs", "20", "--out", "runs/g"],
              changes="10 iterations instead of 200; evaluation 1 network x 20 epochs instead "
                      "of the default 3 x 1000",
              makes="runs/g/distilled.safetensors", estimate=_estimate_distill("g", 200, 3)),
        Entry("distill-gaussian-resume", "splatdd distill --param gaussian --algo dm --ipc 1 "
              "--iterations 400 --out runs/g --resume", "quick",
              ["{splatdd}", "distill", *g, "--iterations", "13", "--eval-runs", "1",
               "--eval-epochs", "20", "--out", "runs/g", "--resume"],
              changes="continues the quick run above to 13 iterations (the README: 200 to 400); "
                      "evaluation 1 x 20 epochs instead of 3 x 1000",
              needs=("distill-gaussian",), prepare=_resume_step,
              estimate=_estimate_distill("g", 200, 3, resumed=True)),
        Entry("torchrun", "torchrun --standalone --nproc_per_node=2 -m splatdd distill --config "
              "fmnist-main", "quick",
              ["{torchrun}", "--standalone", "--nproc_per_node=2", "-m", "splatdd", "distill",
               "--config", "fmnist-main", "--set", "iterations=5", "--set", "eval.runs=0",
               "--out", "runs/fm-torchrun"],
              changes="5 iterations instead of the preset's 100, no evaluation"),
        Entry("torchrun-eval", "torchrun --standalone --nproc_per_node=2 -m splatdd eval "
              "runs/g/distilled.safetensors --runs 4", "quick",
              ["{torchrun}", "--standalone", "--nproc_per_node=2", "-m", "splatdd", "eval",
               "runs/g/distilled.safetensors", "--runs", "2", "--epochs", "5", "--json",
               "{work}/eval_torchrun.json", "--no-progress"],
              changes="2 networks (one per process) x 5 epochs instead of 4 x the paper "
                      "protocol's 1000",
              needs=("distill-gaussian",), estimate=_estimate_torchrun_eval),
        Entry("eval-cross-arch", "splatdd eval runs/g/distilled.safetensors --protocol "
              "cross-arch --model ConvNet,AlexNet --runs 3", "quick",
              ["{splatdd}", "eval", "runs/g/distilled.safetensors", "--protocol", "cross-arch",
               "--model", "ConvNet,AlexNet", "--runs", "1", "--epochs", "5", "--json",
               "{work}/eval.json", "--no-progress"],
              changes="1 network x 5 epochs per model instead of 3 x the protocol's 1000",
              needs=("distill-gaussian",), estimate=_estimate_eval),
        Entry("render", "splatdd render runs/g/distilled.safetensors --out g.png --resolution 64",
              "full", ["{splatdd}", "render", "runs/g/distilled.safetensors", "--out", "g.png",
                       "--resolution", "64"], needs=("distill-gaussian",)),
        Entry("buffer", "splatdd buffer --dataset fashion_mnist --experts 5 --epochs 20 --out "
              "runs/buffer", "probe",
              ["{splatdd}", "buffer", "--dataset", "fashion_mnist", "--experts", "5", "--epochs",
               "20", "--out", "runs/buffer"],
              note="the README's command, stopped with Ctrl-C after the probe time; its last "
                   "progress lines are quoted"),
        Entry("fit", "splatdd fit --methods pixel,siren,gaussian --images 8 --steps 1000",
              "quick", ["{splatdd}", "fit", "--methods", "pixel,siren,gaussian", "--images", "8",
                        "--steps", "50", "--json", "{work}/fit.json"],
              changes="50 steps instead of 1000", estimate=_estimate_fit),
    ]


# ---- running -------------------------------------------------------------------------------------
def _command(entry: Entry, work: Path) -> list[str]:
    splatdd = shutil.which("splatdd") or f"{sys.executable} -m splatdd"
    torchrun = shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run"
    out: list[str] = []
    for a in entry.argv:
        if a == "{splatdd}":
            out += splatdd.split()
        elif a == "{torchrun}":
            out += torchrun.split()
        else:
            out.append(a.replace("{work}", str(work)))
    return out


def _tail(text: str, n: int = 4) -> list[str]:
    lines = [ln.rstrip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return [ln[:300] for ln in lines[-n:]]


def run_entry(entry: Entry, work: Path, readme_text: str, probe_seconds: float) -> Record:
    rec = Record(entry.name, entry.readme, entry.kind, "", entry.changes, None, None, loadavg(),
                 [], note=entry.note, in_readme=entry.readme in readme_text)
    if entry.kind == "quoted":
        rec.command = entry.readme
        step = _quoted_main_job()
        if step is not None:
            rec.seconds = float(step["seconds"])
            rec.load_before = [float(x) for x in str(step.get("load_before", "")).split()[:3]]
            rec.load_after = [float(x) for x in str(step.get("load_after", "")).split()[:3]]
            rec.note += f" ({step.get('date', '?')}, commit {step.get('commit', '?')}: " \
                        f"{step.get('outcome', '')})"
        return rec
    if entry.prepare is not None:
        entry.prepare(work)
    cmd = _command(entry, work)
    rec.command = " ".join(cmd).replace(str(work), "$WORK")
    print(f"[{entry.name}] {rec.command}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={k: v for k, v in os.environ.items()
                                            if k != "SPLATDD_PROGRESS"})
    try:
        out, _ = proc.communicate(timeout=probe_seconds if entry.kind == "probe" else 3600)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)                    # Ctrl-C, as a user would
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            rec.note += "; did not exit within 120 s of Ctrl-C (killed)"
    rec.seconds = time.perf_counter() - t0
    rec.returncode = proc.returncode
    rec.load_after = loadavg()
    rec.tail = _tail(out, 6 if entry.kind == "probe" else 3)
    if entry.estimate is not None and proc.returncode == 0:
        try:
            est = entry.estimate(rec, work)
        except (OSError, KeyError, ValueError, IndexError, ZeroDivisionError) as exc:
            rec.estimate_how = f"no estimate ({type(exc).__name__}: {exc})"
        else:
            if est is not None:
                rec.estimate_seconds, rec.estimate_how = est
    print(f"[{entry.name}] exit {rec.returncode}, {rec.seconds:.1f} s, load {rec.load_after}",
          flush=True)
    return rec


def _quoted_main_job() -> dict[str, Any] | None:
    try:
        data = json.loads((RESULTS / "install.json").read_text())
    except (OSError, ValueError):
        return None
    for step in data.get("steps", []):
        if step.get("name") == "README command 1: main job":
            return step
    return None


# ---- reporting ----------------------------------------------------------------------------------
def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def machine() -> dict[str, Any]:
    import torch
    cpu = cpu_model()
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


def _short(command: str) -> str:
    """The command as a user types it (``splatdd``/``torchrun`` without their install path)."""
    for tool in ("splatdd", "torchrun"):
        path = shutil.which(tool)
        if path:
            command = command.replace(path, tool)
    return command.replace(f"{sys.executable} -m splatdd", "python -m splatdd")


def write(records: list[Record], meta: dict[str, Any]) -> None:
    for r in records:
        r.command = _short(r.command)
    atomic_write_json(JSON_PATH, {**meta, "records": [asdict(r) for r in records]})
    m = meta["machine"]
    lines = [
        "# README commands: measured wall time",
        "",
        f"Written by `benchmarks/readme_timings.py` on {meta['date']} (commit {meta['commit']}). "
        f"Machine: {m['cpu']}, {m['cpus']} cores, torch {m['torch']} with {m['torch_threads']} "
        f"threads (its default), Python {m['python']}. The machine is shared: the load average "
        f"(1 min) before and after each command is given. Each command ran through the "
        f"`splatdd` entry point in a fresh work folder with stdout/stderr piped.",
        "",
        "`kind`: **full** = the README's command as written; **quick** = a quick variant (what "
        "changed is listed), with an *estimate* of the README command's time from the measured "
        "rates where the cost scales linearly; **probe** = the README's command stopped with "
        "Ctrl-C after a while, its last progress line quoted; **quoted** = measured by another "
        "script. Estimates that include evaluation epochs are upper bounds: the per-epoch rate "
        "of a quick run (a few epochs) also carries its one test pass over the 10,000 test "
        "images, which the README's 1000-epoch runs pay once per network.",
        "",
        "| README command | kind | measured | exit | load before / after | estimate of the README "
        "command |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        # a rate per evaluation epoch from a quick run also carries its one-off test pass
        bound = "at most " if "epochs x" in r.estimate_how else ""
        est = (f"{bound}{_fmt(r.estimate_seconds)} (estimate)" if r.estimate_seconds is not None
               else "-")
        load = (f"{r.load_before[0]:.1f} / {r.load_after[0]:.1f}"
                if r.load_before and r.load_after else "-")
        exit_ = "-" if r.returncode is None else str(r.returncode)
        lines.append(f"| `{r.readme}` | {r.kind} | {_fmt(r.seconds)} | {exit_} | {load} | "
                     f"{est} |")
    lines += ["", "## Details", ""]
    for r in records:
        lines.append(f"### {r.name}")
        lines.append("")
        lines.append(f"* README: `{r.readme}`" + ("" if r.in_readme else
                                                  " (no longer in README.md)"))
        if r.kind != "quoted":
            lines.append(f"* ran: `{r.command}`")
        if r.changes:
            lines.append(f"* changed: {r.changes}")
        if r.estimate_how:
            lines.append(f"* estimate: {r.estimate_how}")
        if r.note:
            lines.append(f"* note: {r.note}")
        if r.tail:
            lines.append("* last output lines:")
            lines.append("")
            lines.append("  ```")
            lines += [f"  {ln}" for ln in r.tail]
            lines.append("  ```")
        lines.append("")
    atomic_write_text(MD_PATH, "\n".join(lines).rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", metavar="NAME",
                    help="run only this entry (repeatable) and what it needs; the others keep "
                         "their last results")
    ap.add_argument("--list", action="store_true", help="list the entries and exit")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--probe-seconds", type=float, default=90.0,
                    help="how long a probe entry runs before Ctrl-C (default 90)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite readme_timings.md from readme_timings.json and exit")
    args = ap.parse_args(argv)
    if args.report_only:
        data = json.loads(JSON_PATH.read_text())
        records = [Record(**r) for r in data.pop("records")]
        write(records, data)
        print(f"wrote {MD_PATH} and {JSON_PATH}")
        return 0
    todo = entries()
    by_name = {e.name: e for e in todo}
    if args.list:
        for e in todo:
            print(f"{e.name:<24} {e.kind:<6} {e.readme}")
        return 0
    wanted = set(by_name)
    if args.only:
        unknown = sorted(set(args.only) - set(by_name))
        if unknown:
            ap.error(f"--only: no entry named {', '.join(unknown)} (see --list)")
        wanted = set(args.only)
        for name in list(wanted):         # prerequisites whose output is not in --work yet
            wanted |= {n for n in by_name[name].needs
                       if not (by_name[n].makes and args.work
                               and (Path(args.work) / by_name[n].makes).exists())}
    old: dict[str, dict[str, Any]] = {}
    if args.only and JSON_PATH.is_file():
        old = {r["name"]: r for r in json.loads(JSON_PATH.read_text()).get("records", [])}
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="readme_timings_"))
    work.mkdir(parents=True, exist_ok=True)
    readme_text = (ROOT / "README.md").read_text()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "?"
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
            "machine": machine(), "probe_seconds": args.probe_seconds}
    records: list[Record] = []
    try:
        for e in todo:
            if e.name in wanted:
                records.append(run_entry(e, work, readme_text, args.probe_seconds))
            elif e.name in old:
                records.append(Record(**old[e.name]))
            write(records, meta)                           # partial results survive a stop
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {MD_PATH} and {JSON_PATH}")
    return 0 if all(r.returncode in (0, None) or r.kind == "probe" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
